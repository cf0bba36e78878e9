"""Train the small chat tokenizer the HF-architecture configs use (``configs/tokenizers/chatml-bpe-512``).

    python tools/make_tokenizer.py [--out configs/tokenizers/chatml-bpe-512] [--vocab 512]

A byte-level BPE in the Qwen family's form: Qwen2's pre-tokenizer (digits one by one), the ChatML special
tokens and template, ``<|im_end|>`` as EOS in generation_config.json. It is trained, offline and in seconds,
on the RL tasks' own chat transcripts (addition and digit reversal, ``rl/envs``) and on English docstrings
of the standard library's ``.py`` files, so that it has the merges of a text tokenizer as well as the
task's. The committed directory is this script's output; rerunning it writes the same files with the
pinned ``tokenizers``.
"""

from __future__ import annotations

import argparse
import random
import re
import sysconfig
from pathlib import Path

from precisionrt.models.tokenizer import CHATML, train_bpe
from rl.envs import TaskConfig, make_task


def task_transcripts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for name in ("addition", "reverse_digits"):
        task = make_task(TaskConfig(name=name, min_digits=1, max_digits=5, heldout_size=8))
        for _ in range(n):
            p = task.sample(rng)
            out.append(f"<|im_start|>user\n{p.prompt.decode()}<|im_end|>\n<|im_start|>assistant\n"
                       f"{p.target.decode()}<|im_end|>\n")
    return out


def docstrings(max_chars: int) -> list[str]:
    """Triple-quoted text of the standard library's sources, in sorted path order, up to ``max_chars``."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for doc in re.findall(r'"""(.*?)"""', path.read_text(encoding="utf-8", errors="replace"), re.S):
            texts.append(doc)
            total += len(doc)
            if total >= max_chars:
                return texts
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="configs/tokenizers/chatml-bpe-512")
    p.add_argument("--vocab", type=int, default=512)
    args = p.parse_args()
    texts = task_transcripts(2000) + docstrings(300_000)
    out = train_bpe(args.out, texts, vocab_size=args.vocab, chat_template=CHATML)
    from precisionrt.models.tokenizer import HFTokenizer

    tok = HFTokenizer(out)
    demo = tok.render([{"role": "user", "content": "472+391="}], add_generation_prompt=True).ids
    print(f"{out}: {tok.vocab_size} tokens, eos {tok.eos_ids}; prompt '472+391=' renders as {len(demo)} tokens: "
          f"{[tok.decode([i]) for i in demo]}")


if __name__ == "__main__":
    main()
