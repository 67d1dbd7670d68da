"""``EnergyMonitor``: hooks on an unmodified Hugging Face causal LM that record, per token, the energy
quantities of the final post-norm state (layer ``"final"`` of :mod:`mppm_ext.models.layers`) during a
plain forward over a padded batch or during ``model.generate(...)``, with or without the KV cache.

How a forward call is placed in the sequence: a pre-hook on the model reads ``input_ids`` and the
attention mask; the positions already in the cache are ``mask.shape[1] - input_ids.shape[1]``. A call
that starts where the monitor's current sequences end continues them (cached generation); a call that
starts at 0 and repeats the ids seen so far continues them too, and only its new positions are recorded
(generation without a cache recomputes the whole sequence); any other call at position 0 starts new
sequences. When the forward computes its logits, a hook on the output embedding (the unembedding; its
output is ``h @ W.T + b``) takes them, and each call's rows go to the fused :func:`mppm_ext.energy`
together with the previous position's state and logits row (whose next token this call reveals; the
monitor keeps that one ``[B, V]`` row between calls, never more). Where the model did not compute the
logits of every new position (``logits_to_keep``: ``generate``'s prefill keeps only the last row, and
``logits_to_keep`` given as indices), the call's states go to :func:`mppm_ext.energy_from_hidden`
instead, a second streaming pass over the unembedding. Both give the same numbers (within float32
rounding of the logits: tested), so a cached run records what a run without cache records. Models that
transform the logits further (Gemma-2's soft-capping) are refused at attach time by
:func:`mppm_ext.models.anatomy.unembedding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .records import FEATURES, SequenceRecord, rolling_statistics, write_records

#: Dtypes the compiled ops take; a model in another dtype (float64) is monitored through float32 copies.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_dtype(x: Tensor) -> Tensor:
    return x if x.dtype in _KERNEL_DTYPES else x.float()


@dataclass
class _Segment:
    """The sequences of one batch being recorded: per forward call, ``[B, t]`` tensors of its new positions."""

    ids: list
    mask: list
    values: dict          # feature name -> list of [B, t] float64 tensors
    last_state: Tensor    # [B, d] the final state of the last position seen
    last_token: Tensor    # [B]
    last_real: Tensor     # [B] bool
    last_logits: Optional[Tensor]  # [B, V] the model's logits row of that position, None when it made none

    @property
    def length(self) -> int:
        return sum(x.shape[1] for x in self.ids)

    @property
    def batch(self) -> int:
        return self.ids[0].shape[0]


class EnergyMonitor:
    """Record log K, surprisal, entropy, log E, ‖h‖, cos(h_t, h_{t−1}) and rolling statistics of a causal LM.

    Use as a context manager (or :meth:`attach` / :meth:`detach`)::

        with EnergyMonitor(model, window=16) as mon:
            model.generate(ids, attention_mask=mask, max_new_tokens=32)
        recs = mon.records()      # one SequenceRecord per batch row, padding dropped

    Args:
        model: a Hugging Face causal LM whose blocks, final norm and unembedding
            :mod:`mppm_ext.models.anatomy` can find (ValueError naming the model otherwise).
        window: positions in the trailing window of the rolling statistics (>= 3).
        impl: backend of :func:`mppm_ext.energy` and :func:`mppm_ext.energy_from_hidden`.

    :attr:`computed_from` counts the forward calls scored from the model's own logits (``"logits"``) and
    from the states through a second pass over the unembedding (``"hidden"``).

    The last position seen has no surprisal (its next token was never fed to the model): a generated
    sequence's final token is recorded as input only when the model runs on it.
    """

    def __init__(self, model: nn.Module, *, window: int = 16, impl: str = "auto"):
        from ..models import anatomy, layers

        try:
            self.ref = layers.resolve(model, layers.FINAL)
            weight, bias = anatomy.unembedding(model)
        except (TypeError, ValueError) as err:
            raise ValueError(f"EnergyMonitor: cannot attach to {type(model).__name__}: it lacks the blocks, "
                             f"final norm or unembedding of a Hugging Face causal LM ({err})") from err
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise ValueError(f"window must be an int >= 3 (positions of the rolling statistics), got {window!r}")
        self.model, self.window, self.impl = model, window, impl
        dtype = weight.dtype if weight.dtype in _KERNEL_DTYPES else torch.float32
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.gaussian: Optional[tuple[Tensor, Tensor]] = None  # (mean [d], precision [d, d]) float64
        self.calibration = None  # set by calibrate()
        self._handles: list = []
        self._keep_states: Optional[list] = None  # calibration collects the real states here
        self._head = model.get_output_embeddings()
        self.reset()

    # ------------------------------------------------------------------------------------- hooks

    def attach(self) -> "EnergyMonitor":
        """Register the hooks (idempotent)."""
        from ..models import layers

        if not self._handles:
            self._handles = [self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
                             layers.read_hook(self.model, self.ref, self._on_state),
                             self._head.register_forward_hook(self._on_logits),
                             self.model.register_forward_hook(self._on_done)]
        return self

    def detach(self) -> None:
        """Remove the hooks; the records stay."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "EnergyMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget every record and reset :attr:`computed_from`."""
        self._finished: list[SequenceRecord] = []
        self._segment: Optional[_Segment] = None
        self._call: Optional[tuple] = None
        self._state: Optional[Tensor] = None
        self._logits: Optional[Tensor] = None
        self.computed_from = {"logits": 0, "hidden": 0}

    def _on_call(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("EnergyMonitor needs input_ids [B, T] in every forward call (inputs_embeds alone "
                             "cannot be scored: the surprisal needs the token ids)")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        t = ids.shape[1]
        past = mask.shape[1] - t if isinstance(mask, Tensor) and mask.dim() == 2 else self._cache_length(kwargs)
        new_mask = (mask[:, -t:] if isinstance(mask, Tensor) and mask.dim() == 2 else torch.ones_like(ids)).bool()
        seg = self._segment
        start = 0
        if seg is not None and seg.batch == ids.shape[0] and past == seg.length and past > 0:
            pass  # cached continuation
        elif (seg is not None and past == 0 and seg.batch == ids.shape[0] and t > seg.length
              and torch.equal(ids[:, :seg.length].cpu(), torch.cat(seg.ids, 1))):
            start = seg.length  # recomputation without a cache: record only the new positions
        elif past == 0:
            self._finish_segment()
        else:
            seen = 0 if seg is None else seg.length
            raise RuntimeError(f"EnergyMonitor: a forward call continues a cache at position {past}, but the "
                               f"monitor has seen {seen} positions of its current sequences; call "
                               "monitor.reset() between unrelated runs, and attach it before the prefill")
        # Hugging Face keeps the logits of the last ``logits_to_keep`` positions (0: all); given as a tensor
        # of indices, the rows cannot be placed without reading it, so such a call is scored from the states.
        rows_are_last = not isinstance(kwargs.get("logits_to_keep", 0), Tensor)
        self._call = (ids[:, start:], new_mask[:, start:], start, rows_are_last)
        self._state = self._logits = None

    @staticmethod
    def _cache_length(kwargs) -> int:
        for name in ("cache", "past_key_values"):
            cache = kwargs.get(name)
            if cache is not None and callable(getattr(cache, "get_seq_length", None)):
                return int(cache.get_seq_length())
        return 0

    def _on_state(self, state: Tensor) -> None:
        if self._call is not None:
            self._state = state

    def _on_logits(self, module, args, output) -> None:
        if self._call is not None:
            self._logits = output

    def _on_done(self, module, args, output) -> None:
        if self._call is None or self._state is None:
            return
        ids, mask, start, rows_are_last = self._call
        state, out = self._state, self._logits
        self._call = self._state = self._logits = None
        t = state.shape[1] - start
        usable = isinstance(out, Tensor) and rows_are_last and out.dim() == 3 and out.shape[0] == state.shape[0]
        with torch.no_grad():
            self._record(state[:, start:].detach(),
                         out[:, -t:].detach() if usable and out.shape[1] >= t else None,
                         out[:, -1].detach() if usable else None, ids, mask)

    # ------------------------------------------------------------------------------------ compute

    def _record(self, h: Tensor, logits: Optional[Tensor], last_row: Optional[Tensor], ids: Tensor,
                mask: Tensor) -> None:
        """Score one call's new positions: ``h`` ``[B, t, d]`` their final states, ``logits`` ``[B, t, V]``
        the model's logits of them (None where it did not compute them all), ``last_row`` ``[B, V]`` its
        logits of the last one (None where it computed none)."""
        from .. import energy, energy_from_hidden

        h = _kernel_dtype(h)
        seg = self._segment
        off = 0 if seg is None else 1
        from_logits = logits is not None and (seg is None or seg.last_logits is not None)
        states, tokens, real, rows = h, ids, mask, _kernel_dtype(logits) if from_logits else None
        if off:
            states = torch.cat([seg.last_state[:, None].to(h.dtype), h], 1)
            tokens = torch.cat([seg.last_token[:, None].to(ids.device), ids], 1)
            real = torch.cat([seg.last_real[:, None].to(mask.device), mask], 1)
            if from_logits:
                rows = torch.cat([seg.last_logits[:, None].to(rows.dtype), rows], 1)
        n = states.shape[1]
        if n < 3:  # the ops need 3 positions: pad with masked copies (they add no number)
            pad = 3 - n
            states, tokens = (torch.cat([x, x[:, -1:].expand(-1, pad, *x.shape[2:])], 1) for x in (states, tokens))
            real = torch.cat([real, torch.zeros_like(real[:, :1]).expand(-1, pad)], 1)
            if from_logits:
                rows = torch.cat([rows, rows[:, -1:].expand(-1, pad, -1)], 1)
        if from_logits:
            r = energy(states, rows, tokens, attention_mask=real, impl=self.impl)
        else:
            r = energy_from_hidden(states, self.weight, tokens, bias=self.bias, attention_mask=real, impl=self.impl)
        self.computed_from["logits" if from_logits else "hidden"] += 1
        t = h.shape[1]
        surprisal = (-r.log_prob[:, off:off + t]).double().cpu()
        h64 = states[:, :off + t].double()
        prev = torch.cat([torch.full_like(h64[:, :1], float("nan")), h64[:, :-1]], 1)
        both = real[:, :off + t] & torch.cat([torch.zeros_like(real[:, :1]), real[:, :off + t - 1]], 1)
        cosine = torch.where(both, torch.nn.functional.cosine_similarity(h64, prev, dim=-1), float("nan"))
        new = dict(log_kinetic=r.log_kinetic[:, off:off + t].double().cpu(),
                   surprisal=surprisal, entropy=r.entropy[:, off:off + t].double().cpu(),
                   state_norm=h.double().norm(dim=-1).cpu(), cosine=cosine[:, off:].cpu(),
                   mahalanobis=self._mahalanobis(h))
        if seg is None:
            seg = self._segment = _Segment([], [], {k: [] for k in new}, h[:, -1], ids[:, -1], mask[:, -1], None)
        else:
            seg.values["surprisal"][-1][:, -1] = (-r.log_prob[:, 0]).double().cpu()
        seg.ids.append(ids.cpu())
        seg.mask.append(mask.cpu())
        for k, v in new.items():
            seg.values[k].append(v)
        seg.last_state, seg.last_token, seg.last_real = h[:, -1], ids[:, -1], mask[:, -1]
        # A copy: a view would keep the model's whole [B, T, V] logits alive until the next call.
        seg.last_logits = None if last_row is None else last_row.clone()
        if self._keep_states is not None:
            self._keep_states.append(h[mask].double().cpu())

    def _mahalanobis(self, h: Tensor) -> Tensor:
        if self.gaussian is None:
            return torch.full(h.shape[:2], float("nan"), dtype=torch.float64)
        mean, precision = self.gaussian
        z = h.double().cpu() - mean
        return torch.einsum("btd,de,bte->bt", z, precision, z)

    # ------------------------------------------------------------------------------------ records

    def _render(self, seg: _Segment) -> list[SequenceRecord]:
        ids = torch.cat(seg.ids, 1).numpy()
        mask = torch.cat(seg.mask, 1).numpy()
        values = {k: torch.cat(v, 1).numpy() for k, v in seg.values.items()}
        out = []
        for b in range(ids.shape[0]):
            keep = mask[b]
            row = {k: v[b, keep].astype(np.float64) for k, v in values.items()}
            row["log_energy"] = row["log_kinetic"] + row["surprisal"]
            row["delta_log_kinetic"] = np.abs(np.r_[np.nan, np.diff(row["log_kinetic"])])
            row.update(rolling_statistics(row["log_kinetic"], row["surprisal"], self.window))
            out.append(SequenceRecord(ids[b, keep].astype(np.int64), {name: row[name] for name in FEATURES}))
        return out

    def _finish_segment(self) -> None:
        if self._segment is not None:
            self._finished.extend(self._render(self._segment))
        self._segment = None

    def records(self) -> list[SequenceRecord]:
        """One :class:`SequenceRecord` per sequence seen since the last :meth:`reset`, in order (a batch of
        B gives B records); the sequences still being generated are included as they stand."""
        return self._finished + ([] if self._segment is None else self._render(self._segment))

    def write(self, path, records: Optional[Sequence[SequenceRecord]] = None) -> "object":
        """Write the records (default: :meth:`records`) to ``path`` (``.parquet`` or CSV), one row per token."""
        return write_records(self.records() if records is None else records, path)

    # ------------------------------------------------------------------------- calibration, scores

    def run(self, texts: Sequence[str], tokenizer, *, batch_size: int = 8,
            progress: Optional[object] = None) -> list[SequenceRecord]:
        """Monitor a plain forward over ``texts`` (tokenised without special tokens, right-padded batches of
        ``batch_size``) and return their records (the monitor's own records are left as they were).
        ValueError for an empty list or a text shorter than ``window + 1`` tokens."""
        from .calibration import check_texts

        return self.run_ids(check_texts(texts, tokenizer, self.window), batch_size=batch_size, progress=progress)

    def run_ids(self, sequences: Sequence[Sequence[int]], *, batch_size: int = 8,
                progress: Optional[object] = None) -> list[SequenceRecord]:
        """:meth:`run` on token id lists; ``progress`` (a tqdm bar) advances by one per sequence."""
        saved = (self._finished, self._segment, self._call)
        self._finished, self._segment, self._call = [], None, None
        attached_before = bool(self._handles)
        device = next(self.model.parameters()).device
        # The model computes every position's logits (no logits_to_keep) and the monitor scores them with the
        # fused energy op: measured on SmolLM2-135M, 16 x 64 tokens, 2 threads, the model's [B, T, V] product
        # plus the op took 0.49 s of CPU time against 0.65 s for logits_to_keep=1 and a second pass over the
        # unembedding (energy_from_hidden), for a transient 200 MB of float32 logits.
        try:
            self.attach()
            for i in range(0, len(sequences), batch_size):
                group = sequences[i:i + batch_size]
                width = max(len(x) for x in group)
                ids = torch.zeros(len(group), width, dtype=torch.int64)
                mask = torch.zeros(len(group), width, dtype=torch.int64)
                for row, x in enumerate(group):
                    ids[row, :len(x)] = torch.as_tensor(list(x), dtype=torch.int64)
                    mask[row, :len(x)] = 1
                with torch.no_grad():
                    self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                self._finish_segment()
                if progress is not None:
                    progress.update(len(group))
            return self._finished
        finally:
            if not attached_before:
                self.detach()
            self._finished, self._segment, self._call = saved

    def calibrate(self, texts: Sequence[str], tokenizer, *, batch_size: int = 8, shrinkage: float = 0.1,
                  progress: Optional[object] = None):
        """Fit the reference distributions on natural ``texts``: every feature's empirical distribution
        over the calibration tokens, and the Gaussian of the final states (mean and shrunk covariance
        (1 − shrinkage)·Σ + shrinkage·tr(Σ)/d·I) for the Mahalanobis distance. Returns (and keeps, as
        :attr:`calibration`) a :class:`mppm_ext.monitor.Calibration`.

        Raises ValueError for an empty list, a non-string, or a text shorter than ``window + 1`` tokens.
        """
        from .calibration import Calibration

        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
        self.gaussian = None
        self._keep_states = []
        try:
            records = self.run(texts, tokenizer, batch_size=batch_size, progress=progress)
            states = torch.cat(self._keep_states, 0)
        finally:
            self._keep_states = None
        mean = states.mean(0)
        cov = torch.cov((states - mean).T, correction=0)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype)
        self.gaussian = (mean, torch.linalg.inv(cov + 1e-9 * torch.eye(d, dtype=cov.dtype)))
        # The calibration records get their Mahalanobis distances from the fitted Gaussian.
        offset = 0
        mean, precision = self.gaussian
        for rec in records:
            z = states[offset:offset + len(rec)] - mean
            rec.values["mahalanobis"] = torch.einsum("td,de,te->t", z, precision, z).numpy()
            offset += len(rec)
        self.calibration = Calibration.fit(records, self.window)
        return self.calibration

    def score(self, records: Optional[Sequence[SequenceRecord]] = None, **kwargs):
        """Anomaly scores of ``records`` (default: :meth:`records`) against the calibration; see
        :meth:`mppm_ext.monitor.Calibration.score` for the keyword arguments."""
        if self.calibration is None:
            raise RuntimeError("EnergyMonitor.score needs calibrate(texts, tokenizer) first")
        return self.calibration.score(self.records() if records is None else records, **kwargs)
