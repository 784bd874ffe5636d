"""A run's held-out evaluation: FVU, L0, dead/dense latents and (optionally) the spliced
delta LM loss and KL of raw-unit dictionaries on held-out documents, as training sees them.

The held-out tokens are packed like the training data (`data.pipeline.packed_tokens`, seed
offset 2) and their site activations computed once, then reused by every periodic eval. The
positions scored are those training uses: not <pad>, and not a <bos> (a row's first is cut,
and packed documents are separated by more of them). The trainer, the finetune stage and the
quality scripts all evaluate through `HeldoutEval`, so their numbers compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gemmascope_jax.data.pipeline import packed_tokens
from gemmascope_jax.dictionaries.base import stack_sites
from gemmascope_jax.evals.metrics import evaluate
from gemmascope_jax.evals.saebench import keep_mask
from gemmascope_jax.evals.splice import splice_eval
from gemmascope_jax.gemma3.tokenizer import BOS_ID, PAD_ID


def heldout_tokens(cfg, tok, docs) -> list[np.ndarray]:
    """`cfg.eval.heldout_tokens` tokens of `docs` (at least one batch) as packed int32
    batches [data.batch_size, data.seq_len]."""
    n_batches = max(1, cfg.eval.heldout_tokens // (cfg.data.seq_len * cfg.data.batch_size))
    tokens = packed_tokens(cfg, tok, docs, epochs=None, seed_offset=2)
    return [next(tokens) for _ in range(n_batches)]


class HeldoutEval:
    """FVU/L0/dead/dense on held-out activations (raw units) and, if `cfg.eval.splice`, delta
    LM loss and KL with each dictionary spliced in. `cfg` is a run config (its `data` and
    `eval` sections); `sites` are every site the dictionaries read or write."""

    def __init__(self, cfg, model, tok, sites, heldout_docs):
        self.cfg, self.model, self.tok, self.sites = cfg, model, tok, sites
        self.docs = heldout_docs
        self._data = None

    def tokens_and_sites(self) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
        """(token batches, per-batch `{site: [B, T-1, d]}` activations without the BOS)."""
        if self._data is None:
            tokens = heldout_tokens(self.cfg, self.tok, self.docs)
            forward = self.model.jitted(capture=self.sites, logits=False)
            acts = [
                {s: np.asarray(v[:, 1:]) for s, v in forward(t).sites.items()} for t in tokens
            ]  # BOS is neither trained nor evaluated on
            self._data = tokens, acts
        return self._data

    def __call__(self, dictionaries) -> dict[str, dict[str, Any]]:
        """`{name: metrics}` for `{name: dictionary}` ({} when `eval.heldout_tokens` is 0)."""
        if self.cfg.eval.heldout_tokens == 0:
            return {}
        tokens, acts = self.tokens_and_sites()
        evals = {}
        for name, d in dictionaries.items():
            cfg = d.cfg

            def pairs(cfg=cfg):
                for t, a in zip(tokens, acts, strict=True):
                    # the positions training uses: not <pad>, not a <bos> (the row's first is
                    # already cut; packed documents are separated by more of them)
                    valid = keep_mask(np.asarray(t[:, 1:]), ignore_ids=(PAD_ID, BOS_ID)).reshape(-1)
                    x = stack_sites(a, cfg.input_sites, cfg.multilayer)
                    y = stack_sites(a, cfg.output_sites, cfg.multilayer)
                    yield x.reshape(-1, *x.shape[2:])[valid], y.reshape(-1, *y.shape[2:])[valid]

            result = evaluate(d, pairs())
            if self.cfg.eval.splice:
                result.update(splice_eval(self.model, d, tokens))
            evals[name] = result
        return evals

    def write_cards(self, dictionaries, folder: Path) -> dict[str, Path]:
        """The quality card of each dictionary on the held-out tokens, in `folder`/NAME:
        `{name: card.md path}`."""
        from gemmascope_jax.evals.card import write_card

        tokens, _ = self.tokens_and_sites()
        cards = {}
        for name, d in dictionaries.items():
            out = Path(folder) / name
            write_card(d, self.model, tokens, out, tokenizer=self.tok, absorption=False)
            cards[name] = out / "card.md"
        return cards
