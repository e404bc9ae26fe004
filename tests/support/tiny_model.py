"""A tiny Llama model built locally in seconds, for a real vLLM node on the CPU.

Run with the vLLM environment's Python (it needs `tokenizers`, `transformers` and `torch`):
`.venv-vllm/bin/python -m tests.support.tiny_model [DIRECTORY]`. It writes a byte-level BPE
tokenizer trained on the repository's own Markdown, a 2-layer `LlamaConfig` of width 128 with
seeded random weights, and a chat template that renders tools. The same code gives the same
files; a stamp holding this module's digest makes a second build a no-op.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIRECTORY = PROJECT_ROOT / ".cache" / "tiny-model"
SEED = 20261206
VOCAB_SIZE = 2048
MAX_POSITIONS = 4096
# `<tool_call>` and `</tool_call>` let vLLM's `hermes` tool parser serve the model.
SPECIAL_TOKENS = (
    "<|begin|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<tool_call>",
    "</tool_call>",
)  # fmt: skip
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>Tools:{% for tool in tools %} {{ tool | tojson }}{% endfor %}"
    "<|end|>{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    " {{ call['function'] | tojson }}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus() -> list[str]:
    """The repository's Markdown (README and docs/) and Python sources, in a fixed order: the
    tokenizer's text."""
    paths = [
        *sorted(PROJECT_ROOT.glob("*.md")),
        *sorted((PROJECT_ROOT / "docs").glob("*.md")),
        *sorted((PROJECT_ROOT / "gateway").glob("*.py")),
    ]
    return [path.read_text(encoding="utf-8") for path in paths]


def source_digest() -> str:
    """A digest of this module and its corpus: the build is redone when either changes."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for text in corpus():
        digest.update(text.encode())
    return digest.hexdigest()


def build(directory: Path = DEFAULT_DIRECTORY) -> Path:
    """Write the tokenizer, config and weights into `directory` unless already built."""
    stamp = directory / ".built"
    digest = source_digest()
    if stamp.exists() and stamp.read_text(encoding="utf-8") == digest:
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        model_max_length=MAX_POSITIONS,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(directory)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=wrapped.bos_token_id,
        eos_token_id=wrapped.eos_token_id,
        pad_token_id=wrapped.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    # vLLM reads the generation defaults; none beyond the special tokens.
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}),
        encoding="utf-8",
    )
    stamp.write_text(digest, encoding="utf-8")
    return directory


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIRECTORY))
