"""The data layer: corpus discovery (with the embedded default corpus), tokenizers, memory-mapped
token shards (`prepare`) and the batches training reads (`TokenData`, `BatchSampler`).

    from memoryformer.data import prepare, TokenData
    meta = prepare(["corpus/"], "data/tokens", vocab_size=4096)
    data = TokenData("data/tokens")
    x, y = data.get_batch("train", batch_size=8, seq_len=256, generator=torch.Generator().manual_seed(0))

Modules: corpus (sources, normalisation, default corpus), tokenizer (load / train BPE),
shards (prepare, meta.json), batches (TokenData, BatchSampler).
"""

from memoryformer.data.batches import BatchSampler, TokenData
from memoryformer.data.corpus import (
    Block,
    Corpus,
    default_corpus,
    default_corpus_files,
    normalize_text,
    read_text_file,
    resolve_sources,
)
from memoryformer.data.shards import FORMAT, choose_dtype, is_val_block, prepare
from memoryformer.data.tokenizer import EOT_TOKEN, eot_id, load_tokenizer, tokenizer_vocab_size, train_bpe

__all__ = [
    "EOT_TOKEN",
    "FORMAT",
    "BatchSampler",
    "Block",
    "Corpus",
    "TokenData",
    "choose_dtype",
    "default_corpus",
    "default_corpus_files",
    "eot_id",
    "is_val_block",
    "load_tokenizer",
    "normalize_text",
    "prepare",
    "read_text_file",
    "resolve_sources",
    "tokenizer_vocab_size",
    "train_bpe",
]
