"""The data layer: corpus discovery (with the embedded default corpus), tokenizers, memory-mapped
token shards (`prepare`) and the batches training reads (`TokenData`, `BatchSampler`).

    from memoryformer.data import prepare, TokenData
    meta = prepare(["corpus/"], "data/tokens", vocab_size=4096)
    data = TokenData("data/tokens")
    x, y = data.get_batch("train", batch_size=8, seq_len=256, generator=torch.Generator().manual_seed(0))

Modules: corpus (sources, normalisation, embedded corpora, CorpusReport), tokenizer (load / train
BPE), shards (prepare, meta.json), batches (TokenData, BatchSampler), fingerprint (data_fingerprint,
fingerprint_mismatch: has the data a run depends on changed?). See docs/data.md.
"""

from memoryformer.data.batches import BatchSampler, TokenData
from memoryformer.data.corpus import (
    EMBEDDED_CORPORA,
    Block,
    Corpus,
    CorpusReport,
    default_corpus,
    default_corpus_files,
    embedded_corpus,
    normalize_text,
    read_text_file,
    resolve_sources,
    site_packages_dirs,
)
from memoryformer.data.fingerprint import data_fingerprint, fingerprint_mismatch
from memoryformer.data.shards import FORMAT, choose_dtype, clean_leftovers, is_val_block, prepare
from memoryformer.data.tokenizer import EOT_TOKEN, eot_id, load_tokenizer, tokenizer_vocab_size, train_bpe

__all__ = [
    "EMBEDDED_CORPORA",
    "EOT_TOKEN",
    "FORMAT",
    "BatchSampler",
    "Block",
    "Corpus",
    "CorpusReport",
    "TokenData",
    "choose_dtype",
    "clean_leftovers",
    "data_fingerprint",
    "default_corpus",
    "default_corpus_files",
    "embedded_corpus",
    "eot_id",
    "fingerprint_mismatch",
    "is_val_block",
    "load_tokenizer",
    "normalize_text",
    "prepare",
    "read_text_file",
    "resolve_sources",
    "site_packages_dirs",
    "tokenizer_vocab_size",
    "train_bpe",
]
