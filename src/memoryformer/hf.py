"""Public alias of `memoryformer.integrations.hf`: `import memoryformer.hf` registers the
transformers classes; `python -m memoryformer.hf ARGS` is lm-eval's command line with
`--model memoryformer` registered."""

import sys

from memoryformer.integrations import hf as _hf

if __name__ == "__main__":
    _hf.main()
else:
    sys.modules[__name__] = _hf
