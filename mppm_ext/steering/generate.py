"""Steered generation on an unmodified Hugging Face causal LM (docs/definitions.md, "Jacobian steering").

At every generation step the state of the newest position at one layer is handed to a *delta function*,
which returns a perturbation δ; a forward hook adds δ to that position only. By default the layer is the
final, post-norm state (the input of the LM head) and δ is the minimal-norm step of
:func:`mppm_ext.steer_step` that raises the log-probability of the target tokens by ``gain``.

Why this is correct with the KV cache: with a cache, every forward call computes only the new positions,
and the hook edits the last of them, so the first generated token is steered (it is predicted from the
last prompt position, steered during the prefill) and cached positions are never edited again. Without
a cache (``use_cache=False``) every call recomputes the whole sequence and the hook re-applies each δ
already used at its own position, so the two modes compute the same thing; the tests compare them.

The steered layer is ``"final"`` (the post-norm state that feeds the LM head, the default) or an int,
numbered as :mod:`mppm_ext.models.layers` (0: the embeddings, i: the i-th block's output, -1: the last
block's output, before the final norm).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import kinetic as kinetic_mod
from . import targets as targets_mod

#: Per-step, per-sequence fields of :class:`GenerationResult` (``[B, S]`` tensors), in record order.
RECORD_FIELDS = (
    "token",                   # int64: the generated token
    "delta_norm",              # ||δ|| added at the steered layer (0 when not steered)
    "state_norm",              # ||h|| of the steered layer's state before δ
    "kinetic",                 # K = ½||h_t − h_{t−1}||² of the final state (the states the LM head saw)
    "surprisal",               # −log p(token | steered final state)
    "log_energy",              # log K + surprisal (product energy, docs/definitions.md)
    "target_log_prob_before",  # log p(target set | state before δ); NaN where not known
    "target_log_prob_after",   # log p(target set | state after δ), from the model's own logits
    "target",                  # int64: the one target steered to in energy mode; −1 (no single target) in mode
                               # "all", where every target is raised, and in unsteered or custom-δ runs
    "converged",               # bool: the solver converged (True when not steered)
    "feasible",                # bool: the asked gain was reachable (True when not steered)
)


@dataclass
class StepContext:
    """What a delta function sees at one step.

    Attributes:
        step: index of the token about to be generated (0 = first).
        state: ``[B, d]`` the steered layer's state at the newest position, before δ.
        prev_final: ``[B, d]`` float64 final state of the previous position (as the LM head saw it),
            NaN rows where there is none.
        running_log_energy: ``[B]`` float64 mean log energy of the prompt and the tokens generated so far
            (NaN while undefined; computed in energy mode only).
        input_ids, attention_mask: ``[B, t]`` the left-padded sequence so far, newest position last.
        past_cache: the KV cache of the ``t - 1`` earlier positions as it was before this forward call (a
            fork, see :func:`mppm_ext.steering.cached.fork_cache`), or None in a prefill or without a cache.
    """

    step: int
    state: Tensor
    prev_final: Tensor
    running_log_energy: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    past_cache: Optional[object] = None


@dataclass
class StepDelta:
    """What a delta function returns: ``delta`` ``[B, d]`` (the state's dtype) and ``[B]`` diagnostics."""

    delta: Tensor
    target_log_prob_before: Tensor
    target: Tensor
    converged: Tensor
    feasible: Tensor


DeltaFn = Callable[[StepContext], StepDelta]


@dataclass
class GenerationResult:
    """Output of :func:`steered_generate` for ``B`` prompts and ``S = max_new_tokens`` steps.

    Attributes:
        prompts: the prompt strings; texts: the decoded continuations (special tokens skipped).
        prompt_ids: ``[B, P]`` int64 left-padded prompt ids; prompt_mask: ``[B, P]`` its attention mask.
        One ``[B, S]`` tensor per name in :data:`RECORD_FIELDS` (float64 unless noted there).
        states: ``[B, S, d]`` float32 steered-layer states before δ; deltas: ``[B, S, d]`` float32 δ's.
        targets: per-prompt ``[m_b]`` int64 target ids (empty when unsteered).
        layer: the steered layer as it was given ("final" or an int, see :mod:`mppm_ext.models.layers`).
    """

    prompts: list
    texts: list
    prompt_ids: Tensor
    prompt_mask: Tensor
    token: Tensor
    delta_norm: Tensor
    state_norm: Tensor
    kinetic: Tensor
    surprisal: Tensor
    log_energy: Tensor
    target_log_prob_before: Tensor
    target_log_prob_after: Tensor
    target: Tensor
    converged: Tensor
    feasible: Tensor
    states: Tensor
    deltas: Tensor
    targets: list = field(default_factory=list)
    layer: object = "final"

    def records(self) -> list[list[dict]]:
        """Per sequence, one dict per step with the keys of :data:`RECORD_FIELDS` (Python scalars)."""
        b, s = self.token.shape
        return [[{name: getattr(self, name)[i, j].item() for name in RECORD_FIELDS} for j in range(s)]
                for i in range(b)]


# ----------------------------------------------------------------------------------------------- hooks


class SteeringHook:
    """Context manager that adds a δ to the newest position of one layer's state while active (``layer``
    as :mod:`mppm_ext.models.layers` numbers them, or a LayerRef).

    ``delta_fn`` is called once per forward call with a :class:`StepContext` built from :attr:`context`
    (set by the caller before each call) and the newest position's state. Every δ is remembered with
    its absolute position, so that a forward call that recomputes earlier positions (no KV cache) gets
    the same δ's there; a cached call never sees those positions.
    """

    def __init__(self, model: nn.Module, layer, delta_fn: DeltaFn):
        from ..models import layers

        self.model, self.delta_fn = model, delta_fn
        self.ref = layers.resolve(model, layer)
        # While a delta function runs the model itself (LayerSteerer), the hook only replays earlier δ's.
        self.replay_only = False
        self.applied: list[tuple[int, Tensor]] = []  # (absolute position, δ [B, d])
        self.past = 0  # positions already in the KV cache at the next call
        self.context: Optional[dict] = None  # step, prev_final, running_log_energy for the next call
        self.last: Optional[StepDelta] = None
        self.last_state: Optional[Tensor] = None
        self._handle = None

    def _edit(self, h: Tensor) -> Tensor:
        t = h.shape[1]
        h = h.clone()
        for pos, delta in self.applied:
            if self.past <= pos < self.past + t:
                h[:, pos - self.past] += delta.to(h.dtype)
        if self.replay_only:
            return h
        state = h[:, -1].detach().clone()  # h[:, -1] is edited in place below
        self.last_state = state
        context = dict(self.context)
        if self.ref.is_final and t >= 2:
            # In a prefill the previous final state is in this very tensor (the caller learns it later).
            real = context["attention_mask"][:, -2:-1].bool()
            context["prev_final"] = torch.where(real, h[:, -2].detach().double(), context["prev_final"])
        self.last = self.delta_fn(StepContext(state=state, **context))
        h[:, -1] += self.last.delta.to(h.dtype)
        self.applied.append((self.past + t - 1, self.last.delta))
        return h

    def __enter__(self) -> "SteeringHook":
        from ..models import layers

        self._handle = layers.edit_hook(self.model, self.ref, self._edit)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class _FinalStateCapture:
    """Read-only pre-hook on the LM head: keeps the last two positions of its input (the final states as the
    head saw them, after any δ, whichever hook was registered first)."""

    def __init__(self, model: nn.Module):
        self.model, self.last_two = model, None

    def _hook(self, module, args):
        self.last_two = args[0][:, -2:].detach().double()

    def __enter__(self):
        self._handle = self.model.get_output_embeddings().register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


# ------------------------------------------------------------------------------------ delta functions


def _set_log_prob(log_probs: Tensor, ids: Tensor) -> Tensor:
    """log of the total probability of the token set ``ids`` under one row of log-probabilities."""
    return torch.logsumexp(log_probs[ids], dim=0)


class FinalStateSteerer:
    """Delta function for the final post-norm state: the minimal-norm step of :func:`mppm_ext.steer_step`.

    mode "all": raise log p of every target token of the row by ``gain``. mode "energy": among the row's
    ``top_k`` targets most probable now, steer to the one whose steered log energy (log K + s of the
    candidate itself) is nearest the running mean log energy; before that mean exists, the most probable.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], row_targets: list[Tensor], gain: float,
                 mode: str = "all", top_k: int = 5, solver_options: Optional[dict] = None):
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.row_targets, self.gain, self.mode, self.top_k = row_targets, float(gain), mode, top_k
        self.solver_options = dict(solver_options or {})

    def _log_probs(self, h: Tensor) -> Tensor:
        logits = h.to(self.weight.dtype) @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        return torch.log_softmax(logits.double(), dim=-1)

    def _solve(self, h: Tensor, rows: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """δ ``[R, d]``, converged ``[R]``, feasible ``[R]`` for states ``h [R, d]`` and per-row targets;
        rows with the same number of targets share one solver call."""
        from .. import steer_step

        delta = torch.zeros_like(h)
        converged = torch.ones(h.shape[0], dtype=torch.bool)
        feasible = torch.ones(h.shape[0], dtype=torch.bool)
        if self.gain == 0.0:
            return delta, converged, feasible
        for m in sorted({len(t) for t in rows}):
            idx = torch.tensor([i for i, t in enumerate(rows) if len(t) == m])
            tgt = torch.stack([rows[i] for i in idx.tolist()]).to(h.device)
            want = torch.full(tgt.shape, self.gain, dtype=h.dtype, device=h.device)
            options = dict(self.solver_options)
            if h.dtype == torch.float64:  # only the reference backend takes float64 states
                options.setdefault("impl", "reference")
            res = steer_step(h[idx], self.weight, tgt, want, bias=self.bias, **options)
            delta[idx] = res.delta_h.to(h.dtype)
            converged[idx] = res.converged.cpu()
            feasible[idx] = res.feasible.cpu()
        return delta, converged, feasible

    def __call__(self, ctx: StepContext) -> StepDelta:
        h = ctx.state
        log_probs = self._log_probs(h)
        before = torch.stack([_set_log_prob(lp, t.to(lp.device)) for lp, t in zip(log_probs, self.row_targets)])
        if self.mode == "all":
            delta, converged, feasible = self._solve(h, self.row_targets)
            target = torch.full((h.shape[0],), -1, dtype=torch.int64)
            return StepDelta(delta, before.cpu(), target, converged, feasible)
        # Energy mode: one m = 1 solve per candidate, all rows' candidates in one batch.
        cands = [t[log_probs[i][t.to(h.device)].argsort(descending=True)[: self.top_k]]
                 for i, t in enumerate(self.row_targets)]
        owner = torch.cat([torch.full((len(c),), i) for i, c in enumerate(cands)])
        flat = torch.cat(cands)
        d_all, conv_all, feas_all = self._solve(h[owner], [c.view(1) for c in flat])
        steered = h[owner] + d_all
        lp = self._log_probs(steered)
        surprisal = -lp.gather(1, flat.view(-1, 1).to(lp.device)).squeeze(1).cpu()
        kin = kinetic_mod.step_kinetic(steered.cpu(), ctx.prev_final[owner].cpu())
        log_e = torch.log(kin) + surprisal
        gap = (log_e - ctx.running_log_energy[owner].cpu()).abs()
        delta = torch.zeros_like(h)
        target = torch.empty(h.shape[0], dtype=torch.int64)
        converged = torch.empty(h.shape[0], dtype=torch.bool)
        feasible = torch.empty(h.shape[0], dtype=torch.bool)
        for i in range(h.shape[0]):
            rows = (owner == i).nonzero().view(-1)
            g = gap[rows]
            # Candidates are in descending log p order, so an all-NaN gap picks the most probable.
            j = rows[0] if g.isnan().all() else rows[int(g.nan_to_num(float("inf")).argmin())]
            delta[i], target[i], converged[i], feasible[i] = d_all[j], flat[j], conv_all[j], feas_all[j]
        return StepDelta(delta, before.cpu(), target, converged, feasible)


class LayerSteerer:
    """Delta function for a layer other than "final" (``ref``: the resolved layer): the minimal-norm δ at the
    newest position that raises log p of every target of the row by ``gain``, the Jacobian taken through the
    remaining blocks at that position alone against the KV cache of the earlier positions
    (:mod:`mppm_ext.steering.cached`), all rows with the same number of targets in one solve.

    The cache is the generation's own (``ctx.past_cache``, earlier δ's included); in a prefill or without a
    cache it is built by one forward of the earlier positions while the hook replays their δ's, so both
    modes take the Jacobian in the same context. ``solver_options``: :func:`mppm_ext.steering.steer_layer`'s
    (lam, tol, max_iter, newton_steps, gain_tol, max_step), checked here once.
    """

    def __init__(self, model: nn.Module, ref, row_targets: list[Tensor], gain: float,
                 solver_options: Optional[dict] = None):
        from .cached import solver_options as checked

        self.model, self.ref, self.row_targets, self.gain = model, ref, row_targets, float(gain)
        self.options = {m: checked(dict(solver_options or {}), m) for m in {len(t) for t in row_targets}}
        self.cache_arg = _cache_arg(model)
        self.hook: Optional[SteeringHook] = None  # set by steered_generate

    def _past(self, ctx: StepContext):
        """The KV cache of the earlier positions (None when the sequence has one position)."""
        if ctx.past_cache is not None or ctx.input_ids.shape[1] == 1:
            return ctx.past_cache
        self.hook.past = 0  # replay every earlier δ at its position
        out = self.model(input_ids=ctx.input_ids[:, :-1], attention_mask=ctx.attention_mask[:, :-1],
                         position_ids=_positions(ctx.attention_mask)[:, :-1], use_cache=True)
        return getattr(out, self.cache_arg)

    def __call__(self, ctx: StepContext) -> StepDelta:
        from .cached import fork_cache, steer_newest

        out = _unsteered(ctx.state)
        if self.gain == 0.0:
            return out
        past_positions = self.hook.past
        try:
            self.hook.replay_only = True
            past = self._past(ctx)
            self.hook.past = ctx.input_ids.shape[1] - 1  # the evaluations hold the newest position only
            positions = _positions(ctx.attention_mask)[:, -1:]
            for m, options in sorted(self.options.items()):
                idx = torch.tensor([i for i, t in enumerate(self.row_targets) if len(t) == m])
                every = len(idx) == ctx.state.shape[0]
                inputs = dict(input_ids=ctx.input_ids[idx, -1:], attention_mask=ctx.attention_mask[idx],
                              position_ids=positions[idx])
                tgt = torch.stack([self.row_targets[i] for i in idx.tolist()]).to(ctx.state.device)
                res = steer_newest(self.model, self.ref, ctx.state[idx], inputs,
                                   None if past is None else (past if every else fork_cache(past, idx)),
                                   self.cache_arg, tgt, self.gain, options)
                out.delta[idx] = res.delta_h.to(out.delta.dtype)
                out.target_log_prob_before[idx] = res.log_prob_before.logsumexp(-1).cpu()
                out.converged[idx], out.feasible[idx] = res.converged.cpu(), res.feasible.cpu()
        finally:
            self.hook.replay_only, self.hook.past = False, past_positions
        return out


def _unsteered(state: Tensor) -> StepDelta:
    b = state.shape[0]
    return StepDelta(torch.zeros_like(state), torch.full((b,), float("nan"), dtype=torch.float64),
                     torch.full((b,), -1, dtype=torch.int64), torch.ones(b, dtype=torch.bool),
                     torch.ones(b, dtype=torch.bool))


def no_steering(ctx: StepContext) -> StepDelta:
    """The delta function that steers nothing (δ = 0; target log p before δ not computed)."""
    return _unsteered(ctx.state)


# -------------------------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _left_padded(tokenizer):
    """Left padding (and the EOS token as pad token when there is none) for the duration of the block."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    if pad is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad a batch with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad


def _prompt_log_energy(model, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt, the sum and count ``[B]`` (float64) of the valid log energies of the unsteered prompt."""
    from .. import energy
    from ..models import layers

    b = ids.shape[0]
    if ids.shape[1] < 3:  # no position has a step into it and a token after it
        return torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
    seen = {}
    handle = layers.read_hook(model, layers.FINAL, lambda h: seen.__setitem__("h", h))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    finally:
        handle.remove()
    # The compiled op takes float32 (it accumulates in float64 inside).
    res = energy(seen["h"].float(), logits.float(), ids, attention_mask=mask)
    used = res.valid & res.kinetic.gt(0)
    return torch.where(used, res.log_energy.double(), 0.0).sum(-1).cpu(), used.sum(-1).double().cpu()


@torch.no_grad()
def _shared_prefix(model: nn.Module, prompts: list, ids: Tensor, mask: Tensor, cache_arg: str):
    """The KV cache ``[B]`` of every prompt position but the last, and the final state ``[B, d]`` float64 at
    the last of them, computed once per distinct prompt: no steering method edits these positions (the
    first steered one is the prompt's last), and the benchmark continues each prompt under 10 concepts
    in one batch, so this saves 9 of 10 prompt forwards (a third of a 16-token generation's work after
    a 10-token prompt). Identical prompt strings have identical left-padded rows, so rows are shared."""
    from .cached import fork_cache

    first = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    distinct = torch.tensor(list(first.values()), device=ids.device)
    slot = {p: k for k, p in enumerate(first)}
    inverse = torch.tensor([slot[p] for p in prompts], device=ids.device)
    # Only the last prefix position's final state is wanted: no logits for the others (the LM head is a
    # fifth of SmolLM2's work per position).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    sub = mask[distinct]
    with _FinalStateCapture(model) as capture:
        out = model(input_ids=ids[distinct, :-1], attention_mask=sub[:, :-1], position_ids=_positions(sub)[:, :-1],
                    use_cache=True, **keep)
    return fork_cache(getattr(out, cache_arg), inverse), capture.last_two[:, -1][inverse]


def _cache_arg(model: nn.Module) -> str:
    """The forward's name for the KV cache (transformers 5 renamed past_key_values to cache; the old name
    warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _positions(mask: Tensor) -> Tensor:
    """Position ids that ignore left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_args(prompts, max_new_tokens, gain, mode, top_k, temperature) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    if not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(gain, (int, float)) or not math.isfinite(gain) or gain < 0:
        raise ValueError(f"gain must be a finite number >= 0 (wanted increase of log p), got {gain!r}")
    if mode not in ("all", "energy"):
        raise ValueError(f"mode must be 'all' or 'energy', got {mode!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


@torch.no_grad()
def steered_generate(model: nn.Module, tokenizer, prompts: Sequence[str], targets=None, *, gain: float = 2.0,
                     mode: str = "all", top_k: int = 5, layer="final", max_new_tokens: int = 32,
                     do_sample: bool = False, temperature: float = 1.0, seed: int = 0, use_cache: bool = True,
                     delta_fn: Optional[DeltaFn] = None, solver_options: Optional[dict] = None) -> GenerationResult:
    """Generate ``max_new_tokens`` tokens after each prompt, steering every step towards ``targets``.

    Args:
        model: a Hugging Face causal LM (eval mode), unmodified; hooks are removed on return.
        tokenizer: its tokenizer (padding side and pad token are restored on return).
        prompts: ``B`` non-empty strings, batched with left padding.
        targets: None (natural generation), one list of token ids and/or words for every prompt, or one
            such list per prompt (see :mod:`mppm_ext.steering.targets`).
        gain: wanted increase of log p of each target token per step (0 records without steering).
        mode: "all" (every target token) or "energy" (one of the ``top_k`` most probable targets per step,
            see :class:`FinalStateSteerer`).
        layer: "final" (the post-norm state that feeds the LM head) or an int, numbered as
            :mod:`mppm_ext.models.layers`, steered with :class:`LayerSteerer` (mode "all" only).
        do_sample: sample from softmax(logits / temperature) with a generator seeded by ``seed``;
            otherwise greedy.
        use_cache: False recomputes the whole sequence at each step (for checking the cached path).
        delta_fn: a custom :data:`DeltaFn` instead of the solver (e.g. a fixed direction).
        solver_options: keyword arguments for :func:`mppm_ext.steer_step` (lam, tol, max_iter, ...).

    Returns:
        :class:`GenerationResult` with one record per sequence and step. Generation does not stop at EOS.
    """
    from ..models import layers
    from .cached import fork_cache

    _check_args(prompts, max_new_tokens, gain, mode, top_k, temperature)
    ref = layers.resolve(model, layer)
    if not ref.is_final and mode == "energy":
        raise ValueError("mode 'energy' steers the final state only: use layer='final'")
    device = next(model.parameters()).device
    with _left_padded(tokenizer):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if (mask.sum(-1) == 0).any():
        raise ValueError("a prompt tokenizes to no tokens")
    head = model.get_output_embeddings()
    row_targets = [] if targets is None else targets_mod.resolve_batch(tokenizer, targets, len(prompts),
                                                                        head.weight.shape[0])
    if delta_fn is None and targets is None:
        delta_fn = no_steering
    elif delta_fn is None and ref.is_final:
        delta_fn = FinalStateSteerer(head.weight, getattr(head, "bias", None), row_targets, gain, mode, top_k,
                                     solver_options)
    elif delta_fn is None:
        delta_fn = LayerSteerer(model, ref, row_targets, gain, solver_options)

    b = ids.shape[0]
    energy_sum, energy_count = (_prompt_log_energy(model, ids, mask) if mode == "energy"
                                else (torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)))
    rec = {name: [] for name in RECORD_FIELDS}
    states, deltas = [], []
    cache_arg = _cache_arg(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    seq, attn, cache = ids, mask, None
    # The final state before the newest position (NaN: none, as before a one-token prompt).
    prev_final = torch.full((b, head.weight.shape[1]), float("nan"), dtype=torch.float64, device=device)
    if use_cache and ids.shape[1] > 1:
        cache, last = _shared_prefix(model, list(prompts), ids, mask, cache_arg)
        prev_final = torch.where(mask[:, -2:-1].bool(), last, prev_final)
    hook = SteeringHook(model, ref, delta_fn)
    if isinstance(delta_fn, LayerSteerer):
        delta_fn.hook = hook
    with hook, _FinalStateCapture(model) as capture:
        for step in range(max_new_tokens):
            hook.past = seq.shape[1] - 1 if cache is not None else 0
            running = torch.where(energy_count > 0, energy_sum / energy_count.clamp(min=1), float("nan"))
            hook.context = dict(step=step, prev_final=prev_final, running_log_energy=running, input_ids=seq,
                                attention_mask=attn, past_cache=None if cache is None else fork_cache(cache))
            out = model(input_ids=seq[:, hook.past:], attention_mask=attn, position_ids=_positions(attn)[:, hook.past:],
                        use_cache=use_cache, **{cache_arg: cache})
            cache = getattr(out, cache_arg) if use_cache else None
            log_probs = torch.log_softmax(out.logits[:, -1].double(), dim=-1)
            if do_sample:
                probs = torch.softmax(out.logits[:, -1].double() / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).view(-1)
            else:
                token = log_probs.argmax(-1)
            final_state = capture.last_two[:, -1]
            if step == 0 and capture.last_two.shape[1] == 2:
                # The previous final state of the first step is the prompt's last-but-one, if it is real.
                prev_final = torch.where(mask[:, -2:-1].bool(), capture.last_two[:, 0], float("nan"))
            kinetic = kinetic_mod.step_kinetic(final_state, prev_final)
            surprisal = -log_probs.gather(1, token.view(-1, 1)).view(-1)
            log_energy = torch.log(kinetic) + surprisal
            after = (torch.stack([_set_log_prob(lp, t.to(device)) for lp, t in zip(log_probs, row_targets)])
                     if row_targets else torch.full((b,), float("nan"), dtype=torch.float64, device=device))
            chosen = hook.last
            values = dict(token=token, delta_norm=chosen.delta.double().norm(dim=-1),
                          state_norm=hook.last_state.double().norm(dim=-1), kinetic=kinetic, surprisal=surprisal,
                          log_energy=log_energy, target_log_prob_before=chosen.target_log_prob_before,
                          target_log_prob_after=after, target=chosen.target, converged=chosen.converged,
                          feasible=chosen.feasible)
            for name in RECORD_FIELDS:
                rec[name].append(values[name].cpu())
            states.append(hook.last_state.float().cpu())
            deltas.append(chosen.delta.float().cpu())
            ok = log_energy.isfinite().cpu()
            energy_sum += torch.where(ok, log_energy.cpu(), 0.0)
            energy_count += ok.double()
            prev_final = final_state
            seq = torch.cat([seq, token.view(-1, 1)], dim=1)
            attn = torch.cat([attn, attn.new_ones(b, 1)], dim=1)
    fields_ = {name: torch.stack(v, dim=1) for name, v in rec.items()}
    new = fields_["token"]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return GenerationResult(prompts=list(prompts), texts=texts, prompt_ids=ids.cpu(), prompt_mask=mask.cpu(),
                            states=torch.stack(states, 1), deltas=torch.stack(deltas, 1), targets=row_targets,
                            layer=layer, **fields_)
