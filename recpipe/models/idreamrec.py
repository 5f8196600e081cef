"""iDreamRec (arXiv 2410.13428): text-guided diffusion sequential recommendation.

The model generates an "oracle" item vector x0 in the space of the (whitened, frozen) text vectors of the
items, conditioned on the user's recent history and optionally on an intention vector, and ranks every
item by its inner product with the oracle.

- Denoiser: in-context conditioning, x0 prediction; layout "causal" (default, CausalIDreamRec over
  recpipe.models.dit.CausalDiT: the history tokens are shared by all targets of a training window, so one
  forward trains ~20 targets and one forward serves every guidance branch) or "full" (FullIDreamRec over
  recpipe.models.dit.DiT: one target per forward, every token sees every token). Both share IDreamRec's
  item table, loss, guidance formula and sampler; `IDreamRec.build` picks the class for config.layout.
- Training: x0 = vectors[target], t ~ U{0..T-1}, x_t = q_sample(x0, t, noise), MSE(DiT(x_t, t | h, I), x0).
  Classifier-free guidance training: with probability p_uncond a sample's history is dropped, and then
  its intention too (a fully unconditional sample); otherwise its intention (where present) is dropped
  with probability p_intent_drop. Optional PreferDiff loss (loss="preferdiff"), or a cross-entropy term on
  the x0 prediction's inner products with every item (loss="ce": lam·MSE + (1 − lam)·CE, the loss
  DiffuRec trains with, which ranks like the scoring does).
- Sampling: DDIM from x_T ~ N(0, I), `steps` steps (1 by default: x0 = guided DiT(x_T, T-1)), eta = 0.

Guidance (ONE parameterisation, for every sample):
    x0 = f(∅,∅) + w·(f(h,∅) − f(∅,∅)) + rho·(f(h,I) − f(h,∅))
where f(h,I) := f(h,∅) for a sample without intention, so for it x0 = f(∅,∅) + w·(f(h,∅) − f(∅,∅)),
which is DreamRec's (1 + w')·f(h) − w'·f(∅) with w' = w − 1 (DreamRec's w = 2 is w = 3 here).
    w = 0, rho = 0: the unconditional model f(∅,∅);  w = 1, rho = 0: the plain history-conditional f(h,∅);
    w = 1, rho = 1: the plain fully conditional f(h,I);  w > 1 / rho > 1: extrapolated guidance.
Per sampling step, layout "causal" evaluates every branch a call needs in ONE forward (the branches are
groups over one shared history); layout "full" batches the conditional branches into one forward and gives
the unconditional branch (4 tokens long: its history is a single null token) a second, short one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recpipe.models.base import Recommender, register
from recpipe.models.diffusion import (
    BETA_SCHEDULES,
    Schedule,
    ddim_sample,
    ddim_timesteps,
    make_schedule,
    preferdiff_loss,
    q_sample,
    randn,
    sample_timesteps,
)
from recpipe.models.dit import CausalDiT, DiT
from recpipe.models.losses import catalog_ce

Loss = Literal["mse", "preferdiff", "ce"]
LOSSES = get_args(Loss)
#: lam (the MSE weight) when the config leaves it unset: LAM_DEFAULT, except CE_RESIDUAL_LAM for "ce" with
#: item_residual; "mse" ignores it
LAM_DEFAULT = 0.5
CE_RESIDUAL_LAM = 0.1


@dataclass
class IDreamRecConfig:
    # --- diffusion
    T: int = 1000  # DDPM's standard; only an index, so it costs nothing, and leaves fine k-step DDIM grids
    # abar_{T-1} = 4e-5 so x_T ~ N(0,I) fits t = T-1 (exp: 6e-3); 52% of t at SNR<0.1
    schedule: Literal["linear", "cosine", "exp", "trunc_lin", "linear_var"] = "linear"  # see above
    # --- denoiser (DiT)
    width: int = 128  # 2x DreamRec's D = 64 for 384-d text inputs; 256 learns more per epoch at several times the CPU
    depth: int = 2  # 2: history tokens interact before the read-out (SASRec's ML-1M depth); 1 is cheaper
    heads: int = 4  # head dim 32, the usual 32-64 range
    mlp_ratio: float = 4.0  # the transformer standard (DiT, DiffuRec)
    dropout: float = 0.1  # DreamRec / DiffuRec / PreferDiff all use 0.1
    adaln_zero: bool = False  # iDreamRec conditions in-context only; adaLN-Zero is the DiT alternative
    history_len: int = 20  # ML-1M histories are long but CPU cost is linear in tokens; 2x DreamRec's 10
    # causal: history tokens shared by the targets of a window (causal history attention,
    # relative positions; dit.CausalDiT): the same validation NDCG@10 after one ML-1M epoch as "full" (0.050
    # vs 0.052) in ~5x less CPU time, and one forward for all guidance branches. "full": every token sees
    # every token, one target per forward, absolute positions (dit.DiT; needed for adaln_zero)
    layout: Literal["causal", "full"] = "causal"  # see above
    window: int = 20  # causal layout: targets per training window (each sees its own history_len items)
    # causal layout: a full-rank copy path (attention over the history applied to the items' own d-dim vectors,
    # zero-initialised gate; dit.CausalDiT). Off = the paper's denoiser, whose output is rank width < d
    copy: bool = False  # see above
    # --- training
    p_uncond: float = 0.1  # iDreamRec / DreamRec / PreferDiff: history dropped with p = 0.1
    p_intent_drop: float = 0.1  # same rate for the intention, so f(h, ∅) is learned where intents exist
    # iDreamRec: x0 target, MSE, no negative sampling; "preferdiff" = PreferDiff (lam·MSE + (1−lam)·BPR-Diff-C);
    # "ce" = lam·MSE + (1−lam)·cross-entropy of x0_hat·item_table()ᵀ/√d over every item (DiffuRec's loss: it
    # trains the ranking the scores are, where MSE only regresses to the mean of the plausible next items)
    loss: Loss = "mse"  # the paper's; see above
    # weight of MSE in "preferdiff" / "ce"; None = the loss's own default: PreferDiff's config lamda 0.5, and
    # for "ce" 0.1 with item_residual (the CE then trains the residual; ML-1M, 2 epochs: test NDCG@10 0.0956
    # masked at 0.1 vs 0.0882 at 0.5), else 0.5 (frozen vectors: the MSE keeps x0 in the text space; beauty,
    # copy path, 3 epochs: 0.0435 at 0.5 vs 0.0371 at 0.1)
    lam: float | None = None  # see above; resolved when the config is built, so checkpoints record the number
    # loss "ce": 0 = the softmax over every item; N = sampled softmax against N uniform negatives shared by
    # the batch (recpipe.models.losses): a step's cost no longer grows with the catalog
    ce_negatives: int = field(default=0, metadata={"late": True})  # see above
    scale: float = 5.0  # PreferDiff's gamma (scale inside the log-sigmoid), its config default
    n_neg: int = 4  # negatives averaged into one centroid (PreferDiff "-C"): one extra forward whatever n
    item_residual: bool = False  # learnable per-item residual on the frozen text vectors (off = paper)
    # a residual computed from the text vector itself (an MLP of this hidden width, zero-initialised output;
    # 0 = off): unlike the per-item residual it reaches items with no training data (new items), which get
    # what their text says instead of nothing
    text_residual: int = field(default=0, metadata={"late": True})  # see above
    # a learned "new item" vector, added to the vector of every item without training data (the cold-item
    # protocol's new items, a catalog's additions), in place of the per-item residual it cannot have. What it
    # is worth is learned from the training data's own newest items: this share of the training items (the
    # latest by first interaction) takes that form in a training step with probability new_drop (their own
    # residual dropped, the new vector added) and its ordinary form otherwise, which it keeps for scoring. A new
    # item's score then moves with the history (<oracle, new vector>), where a constant boost would move it
    # for every user alike. 0 = off
    new_items: float = field(default=0.0, metadata={"late": True})  # see above
    new_drop: float = field(default=0.5, metadata={"late": True})  # see above
    # a score offset for items without training data, in units of the oracle's norm (about one standard
    # deviation of a user's scores over whitened vectors): the learned new-item vector is fitted to how often
    # the training's newest items are targets over the whole training data, but a catalog's newest items are
    # due more often at its end (amazon-beauty's cold split: 10% of the items, 20% of the test targets, 3% of
    # the top-10 slots without it). train.new_bias_grid chooses it on the validation split, where the training's
    # newest items play the new items' part; 0 = none. An offset in these units keeps recommend's inner-product
    # index exact (recommend adds it to the new items it scores beside the index)
    new_bias: float = field(default=0.0, metadata={"late": True})  # see above
    # this share of the training items, the newest by first interaction (within new_items' share), is never a
    # training target (no loss, no CE class, no PreferDiff negative; histories still hold them, in the new
    # form): items the model was never asked to predict, as a catalog's new items are. They stand in for new
    # items when train.new_bias_grid chooses the offset (the trained newest items understate it: the model
    # already predicts them), and they take the offset from then on. Costs their targets; 0 = off
    new_holdout: float = field(default=0.0, metadata={"late": True})  # see above
    residual_target_grad: bool = False  # False: the residual learns from history tokens only (stop-gradient
    # on the x0 target, as in BYOL/SimSiam), True: also from the target, which lets x0-MSE shrink the space
    # --- sampling / scoring
    w: float = 3.0  # history guidance, = DreamRec's w = 2 ((1+2)·f(h) − 2·f(∅)); w = 1: no guidance
    rho: float = 1.0  # intention guidance; 1 = use f(h, I) as is, 0 = ignore the intention
    steps: int = 1  # iDreamRec: one DDIM step from noise works about as well as many
    # which t a training target is noised to: "all" = Uniform{0..T-1} (the paper, DDPM); "sampler" = only the
    # timesteps the DDIM sampler above visits (steps = 1: t = T-1 alone), so no training goes to the t < T-1
    # the one-step generation never asks about; a model trained so must be sampled with the same steps
    train_t: Literal["all", "sampler"] = field(default="all", metadata={"late": True})  # see above
    eta: float = 0.0  # deterministic DDIM (given x_T)

    def __post_init__(self) -> None:
        if self.schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule must be one of {BETA_SCHEDULES}, got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 1 <= self.steps <= self.T:
            raise ValueError(f"steps must be in [1, T={self.T}], got {self.steps}")
        if self.history_len < 1:
            raise ValueError("history_len must be >= 1")
        if self.lam is None:
            self.lam = CE_RESIDUAL_LAM if self.loss == "ce" and self.item_residual else LAM_DEFAULT
        for name in ("p_uncond", "p_intent_drop", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.n_neg < 1:
            raise ValueError("n_neg must be >= 1")
        if self.text_residual < 0:
            raise ValueError(f"text_residual must be >= 0 (0 = off), not {self.text_residual}")
        if not 0.0 <= self.new_items < 1.0:
            raise ValueError(f"new_items must be in [0, 1) (a share of the training items; 0 = off), "
                             f"not {self.new_items}")
        if not 0.0 < self.new_drop <= 1.0:
            raise ValueError(f"new_drop must be in (0, 1], not {self.new_drop}")
        if not math.isfinite(self.new_bias):
            raise ValueError(f"new_bias must be a finite number, not {self.new_bias}")
        if not 0.0 <= self.new_holdout <= self.new_items:
            raise ValueError(f"new_holdout must be in [0, new_items = {self.new_items:g}] (a share of the training "
                             f"items, within the newest), not {self.new_holdout}")
        if self.new_bias and not self.new_items:
            raise ValueError("new_bias needs new_items > 0 (the offset goes to the items scored in the new form)")
        if self.ce_negatives < 0:
            raise ValueError(f"ce_negatives must be >= 0 (0 = softmax over every item), not {self.ce_negatives}")
        if self.layout not in ("full", "causal"):
            raise ValueError(f"layout must be causal or full, not {self.layout!r}")
        if self.copy and self.layout != "causal":
            raise ValueError("copy needs layout = 'causal'")
        if self.layout == "causal" and self.adaln_zero:
            raise ValueError("adaln_zero needs layout = 'full' (causal groups have no single condition vector)")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.train_t not in ("all", "sampler"):
            raise ValueError(f"train_t must be all or sampler, not {self.train_t!r}")


@register("idreamrec", IDreamRecConfig)
class IDreamRec(Recommender):
    """iDreamRec over frozen whitened text vectors; see the module docstring. The parts both layouts share:
    the item table, the diffusion loss (MSE / CE / PreferDiff), the guidance formula, sampling and scoring.
    `build` makes a FullIDreamRec or a CausalIDreamRec, which supply the denoiser and how it reads targets."""

    generative = True
    uses_text = True
    uses_intent = True
    sampler_params = ("steps", "w", "rho", "dtype")
    #: the axis of a training batch along which targets lie: 0 (one target per row, "position" batches)
    #: or 1 (several targets of one window per row); PreferDiff stacks its negatives along it
    target_axis: int = 0

    @classmethod
    def build(cls, config: IDreamRecConfig, n_items: int, item_vectors: Tensor | None = None) -> IDreamRec:
        layout = CausalIDreamRec if config.layout == "causal" else FullIDreamRec
        return layout(config, n_items, item_vectors)

    def __init__(self, config: IDreamRecConfig, n_items: int, item_vectors: Tensor | None,
                 window: int | None = None):
        if type(self) is IDreamRec:
            raise TypeError("IDreamRec has one class per layout: use IDreamRec.build or build_model('idreamrec')")
        super().__init__(n_items, config.history_len, window=window)
        if item_vectors is None:
            raise ValueError("idreamrec needs item_vectors (n_items + 1, d): the whitened text vectors")
        if item_vectors.dim() != 2 or item_vectors.shape[0] != n_items + 1:
            raise ValueError(
                f"item_vectors must be (n_items + 1, d) = ({n_items + 1}, d), got {tuple(item_vectors.shape)}"
            )
        self.config = config
        self.dim = int(item_vectors.shape[1])
        # frozen text vectors, row 0 = padding (saved in checkpoints so that scores are reproducible)
        self.register_buffer("item_vectors", item_vectors.detach().float().clone().contiguous())
        if config.item_residual:
            # learnable correction of each item's vector, zero at init; padding_idx keeps row 0 at zero
            self.item_residual = nn.Embedding(n_items + 1, self.dim, padding_idx=0)
            nn.init.zeros_(self.item_residual.weight)
        else:
            self.item_residual = None
        self.text_map: nn.Module | None = None
        if config.text_residual:
            self.text_map = nn.Sequential(nn.Linear(self.dim, config.text_residual), nn.GELU(),
                                          nn.Linear(config.text_residual, self.dim))
            nn.init.zeros_(self.text_map[2].weight)  # starts as the frozen text vectors themselves
            nn.init.zeros_(self.text_map[2].bias)
        self.new_vec: nn.Parameter | None = None
        if config.new_items > 0:
            self.new_vec = nn.Parameter(torch.zeros(self.dim))  # zero: a new item starts as its text says
            # observe_training sets both; saved with the weights, as scoring needs them after a reload
            self.register_buffer("unseen", torch.zeros(n_items + 1, dtype=torch.bool))  # no training data
            self.register_buffer("newest", torch.zeros(n_items + 1, dtype=torch.bool))  # the training's newest
            if config.new_holdout > 0:  # the newest of those, never a target (new_holdout)
                self.register_buffer("heldout", torch.zeros(n_items + 1, dtype=torch.bool))
        self._form: Tensor | None = None  # in a training step: the items in a new item's form (_new_form)
        self._schedule_cpu = make_schedule(config.schedule, config.T)  # float64
        self._schedules: dict[torch.device, Schedule] = {}
        # the items of the training data (observe_training); None: every item. Items outside it (the cold-item
        # protocol's new items) are no class of the CE and no PreferDiff negative: at training time they do
        # not exist yet, so no row of theirs is trained and the generator is not taught to avoid them
        self._known: Tensor | None = None  # (n_items + 1,) bool
        self._known_ids: Tensor | None = None  # (K,) the training items, ascending: PreferDiff's negatives
        self._known_pos: Tensor | None = None  # (n_items + 1,) an item's index in _known_ids

    def _dit_size(self) -> dict:
        c = self.config
        return dict(dim=self.dim, max_len=c.history_len, width=c.width, depth=c.depth, heads=c.heads,
                    mlp_ratio=c.mlp_ratio, dropout=c.dropout)

    # ------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------

    def observe_training(self, counts: Tensor, first_seen: Tensor | None = None) -> None:
        seen = (counts > 0).to(self.item_vectors.device)
        if self.new_vec is not None:
            if first_seen is None:
                raise ValueError("idreamrec new_items needs the items' first training timestamps (first_seen)")
            first = first_seen.to(self.item_vectors.device).double()
            known = seen.nonzero().squeeze(1)
            known = known[known != 0]
            k = int(round(self.config.new_items * len(known)))
            # the latest first interactions; ties broken by id so every process picks the same items
            order = known[torch.argsort(first[known] * (self.n_items + 1) + known.double(), descending=True)]
            self.unseen.copy_(~seen)
            self.unseen[0] = False
            self.newest.zero_()
            self.newest[order[:k]] = True
            if self.config.new_holdout > 0:
                h = min(k, max(1, int(round(self.config.new_holdout * len(known)))))
                self.heldout.zero_()
                self.heldout[order[:h]] = True
                seen = seen & ~self.heldout  # no class, no negative, no target: as if new
        if bool(seen[1:].all()):
            self._known = self._known_ids = self._known_pos = None
            return
        self._known = seen
        self._known_ids = seen.nonzero().squeeze(1)
        self._known_pos = seen.long().cumsum(0) - 1

    def schedule(self, device: torch.device | None = None) -> Schedule:
        """The diffusion schedule (float64) on `device` (default: the model's), cached per device."""
        device = torch.device(device) if device is not None else self.item_vectors.device
        if device not in self._schedules:
            self._schedules[device] = self._schedule_cpu.to(device)
        return self._schedules[device]

    def _learned(self, ids: Tensor | None) -> Tensor | None:
        """The learned part of item vectors (per-item residual + text residual + the new-item vector), rows
        `ids` ((...) ids) or every row (None); padding's row is zero. None when the model learns none (the
        paper's frozen vectors)."""
        out = None
        if self.text_map is not None:
            v = self.item_vectors if ids is None else self.item_vectors[ids]
            out = self.text_map(v)
            real = (torch.arange(len(v), device=v.device) if ids is None else ids) != 0
            out = out * real.unsqueeze(-1).to(out.dtype)
        new = None
        if self.new_vec is not None:
            form = self.scoring_form() if self._form is None else self._form
            new = (form if ids is None else form[ids]).unsqueeze(-1)  # (..., 1) bool
        if self.item_residual is not None:
            r = self.item_residual.weight if ids is None else self.item_residual(ids)
            if new is not None:
                r = r * ~new  # a new item has no residual of its own
            out = r if out is None else out + r
        if new is not None:
            nv = new * self.new_vec
            out = nv if out is None else out + nv
        return out

    def scoring_form(self) -> Tensor:
        """(n_items + 1,) bool: the items scored in a new item's form outside training: those without training
        data, and with new_drop = 1 the training's newest too, which never trained in any other form (their
        own residual is always dropped, so their ordinary form would lack the new vector they learned with)."""
        return (self.unseen | self.newest if self.config.new_drop >= 1.0 else self.unseen) | self._held()

    def _held(self) -> Tensor | bool:
        """(n_items + 1,) bool: the held-out newest items (new_holdout), or False without them."""
        return self.heldout if self.config.new_holdout > 0 else False

    def offset_items(self) -> Tensor:
        """(n_items + 1,) bool: the items the new-item offset goes to: no training data, or never a target."""
        return self.unseen | self._held()

    def _new_form(self, generator: torch.Generator | None, dev: torch.device) -> Tensor | None:
        """(n_items + 1,) bool for one training step: the items scored in a new item's form, each of the newest
        training items with probability new_drop (and the untrained ones, which no batch holds)."""
        if self.new_vec is None:
            return None
        gen_dev = generator.device if generator is not None else dev
        drawn = (torch.rand(self.n_items + 1, generator=generator, device=gen_dev) < self.config.new_drop).to(dev)
        return self.unseen | (self.newest & drawn) | self._held()

    def item_table(self) -> Tensor:
        """(n_items + 1, d): the vectors used for history tokens, training targets and scoring."""
        learned = self._learned(None)
        return self.item_vectors if learned is None else self.item_vectors + learned

    def item_vecs(self, ids: Tensor) -> Tensor:
        """ids: LongTensor (...) -> (..., d), = item_table()[ids]."""
        learned = self._learned(ids)
        v = self.item_vectors[ids]
        return v if learned is None else v + learned

    def target_vecs(self, ids: Tensor) -> Tensor:
        """The regression targets: item_vecs(ids), with the learned part's gradient stopped unless
        residual_target_grad (a target the loss may move collapses under x0-MSE: pulling every item's
        vector together lowers the loss; measured on ML-1M, validation NDCG@10 fell with it)."""
        learned = self._learned(ids)
        v = self.item_vectors[ids]
        if learned is None:
            return v
        return v + (learned if self.config.residual_target_grad else learned.detach())

    def _history(self, history: Tensor) -> Tensor:
        """Left-pad with 0 / keep the last history_len columns: (B, L_in) -> (B, history_len)."""
        L = self.config.history_len
        if history.shape[1] >= L:
            return history[:, history.shape[1] - L :]
        return F.pad(history, (L - history.shape[1], 0), value=0)

    @staticmethod
    def _intent(batch: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """(intent (..., d), intent_mask (...) bool) or (None, None) when the batch has no intention;
        (B, d) / (B,) per sample, or (B, C, d) / (B, C) per target of a window."""
        if "intent" not in batch:
            return None, None
        intent = batch["intent"]
        mask = batch.get("intent_mask")
        if mask is None:
            mask = torch.ones(intent.shape[:-1], dtype=torch.bool, device=intent.device)
        return intent.float(), mask.bool()

    # ------------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------------

    def _condition(self, batch: dict[str, Tensor]):
        """The layout's view of a training batch's histories, passed back to _denoise_targets."""
        raise NotImplementedError

    def _denoise_targets(self, cond, x_t: Tensor, t: Tensor, hist_keep: Tensor, intent: Tensor | None,
                         intent_mask: Tensor | None, copies: int = 1) -> Tensor:
        """x0_hat for every target of a training batch: x_t (*S, d), t / hist_keep / intent_mask (*S),
        S = the target shape. copies = 2: the targets are stacked twice along target_axis (PreferDiff's
        positives and negatives), under the same histories."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """batch["target"]: (B,) one target per row, or (B, C) the targets of a window (0 = not a target).
        Per target: t, noise, history drop, then intention drop, drawn in that order (after the step's
        new-item forms, with new_items)."""
        self._form = self._new_form(generator, batch["target"].device)
        try:
            return self._loss(batch, generator)
        finally:
            self._form = None

    def _loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        cfg = self.config
        target = batch["target"]
        shape, n, dev = target.shape, target.numel(), target.device
        cond = self._condition(batch)
        s = self.schedule(dev)
        gen_dev = generator.device if generator is not None else dev

        x0 = self.target_vecs(target)  # (*S, d)
        choices = ddim_timesteps(cfg.T, cfg.steps) if cfg.train_t == "sampler" else None
        t = sample_timesteps(n, cfg.T, generator, dev, choices=choices)  # (n,)
        x_t = q_sample(s, x0.reshape(n, -1), t, randn((n, self.dim), generator, dev)).view(x0.shape)
        t = t.view(shape)
        hist_keep = (torch.rand(shape, generator=generator, device=gen_dev) >= cfg.p_uncond).to(dev)
        intent, intent_mask = self._intent(batch)
        if intent is not None:
            keep_i = (torch.rand(shape, generator=generator, device=gen_dev) >= cfg.p_intent_drop).to(dev)
            intent_mask = intent_mask & hist_keep & keep_i  # a dropped history is fully unconditional
        is_t = target != 0
        if self.new_vec is not None and self.config.new_holdout > 0:
            is_t = is_t & ~self.heldout[target]  # never a target: they stand in for new items

        if cfg.loss != "preferdiff":
            x0_hat = self._denoise_targets(cond, x_t, t, hist_keep, intent, intent_mask)
            return self._regression_loss(x0_hat[is_t], x0[is_t], target[is_t], generator)

        # PreferDiff: n_neg items != target, uniformly; their centroid is noised at the same t and
        # denoised under the same condition, in the same forward as the positive
        if self._known is None:
            r = torch.randint(1, self.n_items, (*shape, cfg.n_neg), generator=generator, device=gen_dev).to(dev)
            neg = r + (r >= target[..., None]).long()  # uniform over {1..n_items} \ {target}
        else:  # uniform over the training items but the target (a target is a training item)
            ids = self._known_ids.to(dev)
            pos = self._known_pos.to(dev)[target.clamp(min=1)]  # the target's index in ids
            r = torch.randint(0, len(ids) - 1, (*shape, cfg.n_neg), generator=generator, device=gen_dev).to(dev)
            neg = ids[r + (r >= pos[..., None]).long()]
        x0_neg = self.item_vecs(neg).mean(dim=-2)  # (*S, d)
        x_t_neg = q_sample(s, x0_neg.reshape(n, -1), t.reshape(-1), randn((n, self.dim), generator, dev))
        ax = self.target_axis

        def two(a: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, a], dim=ax)

        out = self._denoise_targets(cond, torch.cat([x_t, x_t_neg.view(x0.shape)], dim=ax), two(t),
                                    two(hist_keep), two(intent), two(intent_mask), copies=2)
        pos, negs = out.chunk(2, dim=ax)
        return preferdiff_loss(pos[is_t], x0[is_t], negs[is_t], x0_neg[is_t], lam=cfg.lam, scale=cfg.scale)

    def _regression_loss(self, x0_hat: Tensor, x0: Tensor, target: Tensor,
                         generator: torch.Generator | None = None) -> Tensor:
        """x0_hat, x0: (M, d), target: (M,) item ids -> MSE, or for loss "ce" lam·MSE + (1 − lam)·CE, where
        the CE's logits are x0_hat·item_table()ᵀ/√d over the real items (padding is never a class; sampled
        against ce_negatives of them when set). The item table keeps its gradient here (a residual trained
        by CE cannot collapse: CE must tell items apart)."""
        m = max(x0.shape[0], 1)  # a batch without targets gives 0, not NaN
        mse = ((x0_hat - x0) ** 2).mean(dim=1).sum() / m
        if self.config.loss == "mse":
            return mse
        ce = catalog_ce(x0_hat, target, self.item_table()[1:], n_neg=self.config.ce_negatives, generator=generator,
                        allowed=self._known_ids, temperature=self.dim**0.5, reduction="sum") / m
        return self.config.lam * mse + (1.0 - self.config.lam) * ce

    # ------------------------------------------------------------------------------------------------
    # generation and scoring
    # ------------------------------------------------------------------------------------------------

    #: rows per DiT forward when sampling (CPU throughput per row peaks at 256-512 rows, measured)
    sample_chunk: int = 512

    def guided_x0(
        self,
        x_t: Tensor,
        t: Tensor,
        history: Tensor,
        intent: Tensor | None,
        intent_mask: Tensor | None,
        w: float,
        rho: float,
    ) -> Tensor:
        """x0 = (1 − w)·f(∅,∅) + (w − rho·m)·f(h,∅) + rho·m·f(h,I), m = intention present (B,).

        Only the branches with a non-zero coefficient are evaluated, as the layout batches them.
        x_t: (B, d), t: (B,) -> (B, d).
        """
        B, dev = x_t.shape[0], x_t.device
        if intent is None:
            m = torch.zeros(B, dtype=torch.bool, device=dev)
        elif intent_mask is None:
            m = torch.ones(B, dtype=torch.bool, device=dev)
        else:
            m = intent_mask.bool()
        return self._guided(x_t, t, history, intent, m, w, rho)

    def _guided(self, x_t: Tensor, t: Tensor, history: Tensor, intent: Tensor | None, m: Tensor, w: float,
                rho: float) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Tensor],
        steps: int | None = None,
        w: float | None = None,
        rho: float | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """The guided oracle vector (B, d) in float32: DDIM from x_T ~ N(0, I) (drawn with `generator`, unless
        given: a service batching requests gives each row the noise its request would draw alone).

        steps / w / rho default to the config's; steps = T with eta = 1 is ancestral DDPM sampling.
        dtype = torch.bfloat16 runs the denoiser's matmuls under bf16 autocast (~1.6x faster on CPUs with
        native bf16; the guidance sum and the sampler stay float32).
        """
        cfg = self.config
        steps = cfg.steps if steps is None else int(steps)
        w = cfg.w if w is None else float(w)
        rho = cfg.rho if rho is None else float(rho)
        history = self._history(batch["history"])
        intent, intent_mask = self._intent(batch)
        dev = history.device

        amp = dtype is not None and dtype != torch.float32

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            with torch.autocast(dev.type, dtype=dtype, enabled=amp):
                return self.guided_x0(x_t, t, history, intent, intent_mask, w, rho).float()

        return ddim_sample(
            model_fn,
            self.schedule(dev),
            (history.shape[0], self.dim),
            steps,
            eta=cfg.eta,
            prediction_type="x0",
            generator=generator,
            device=dev,
            x_T=x_T,
        )

    @torch.no_grad()
    def score_all(
        self,
        batch: dict[str, Tensor],
        steps: int | None = None,
        w: float | None = None,
        rho: float | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        new_bias: float | None = None,
        pseudo_new: bool = False,
    ) -> Tensor:
        """(B, n_items + 1) inner products of the oracle with every item vector, plus new_bias (default: the
        config's) x the oracle's norm for the items without training data; column 0 = -inf.
        The scores are float32 whatever `dtype` the denoiser ran at (bf16 scores would tie).
        pseudo_new: how train.new_bias_grid chooses new_bias on the validation split. With new_holdout, the held-out
        items are the new items there (they already take the new form and the offset); without it the training's
        newest items are scored as new items are (new form, offset) and the others as trained. Items with no
        training data at all take the offset either way."""
        oracle = self.generate(batch, steps=steps, w=w, rho=rho, generator=generator, dtype=dtype)  # (B, d)
        bias = self.config.new_bias if new_bias is None else float(new_bias)
        if pseudo_new and self.config.new_holdout > 0:
            table = self.item_table()
            offset_items = self.offset_items()
        elif pseudo_new:
            if self.new_vec is None:
                raise ValueError("pseudo_new needs new_items > 0")
            # the training's newest items take the new items' part: their new form, and the offset
            self._form = self.unseen | self.newest
            try:
                table = self.item_table()
            finally:
                self._form = None
            offset_items = self.newest | self.unseen
        else:
            table = self.item_table()
            offset_items = self.offset_items() if self.new_vec is not None else None
        scores = oracle @ table.T  # (B, n_items + 1)
        if bias and offset_items is not None:
            scores = scores + (bias * oracle.norm(dim=1, keepdim=True)) * offset_items.to(scores.dtype)
        scores[:, 0] = float("-inf")
        return scores

    def new_item_offset(self) -> tuple[Tensor, float] | None:
        """(ids of the items scored with the new-item offset, the offset in units of the oracle's norm), or None
        when no item gets one: recommend adds it beside an inner-product index of item_table()."""
        if self.new_vec is None or not self.config.new_bias:
            return None
        ids = self.offset_items().nonzero().squeeze(1)
        return (ids, float(self.config.new_bias)) if len(ids) else None


class FullIDreamRec(IDreamRec):
    """Layout "full" (recpipe.models.dit.DiT): one target per forward, every token sees every token."""

    train_mode = "position"
    target_axis = 0

    def __init__(self, config: IDreamRecConfig, n_items: int, item_vectors: Tensor | None):
        super().__init__(config, n_items, item_vectors)
        self.dit = DiT(adaln_zero=config.adaln_zero, **self._dit_size())

    def denoise(
        self,
        x_t: Tensor,
        t: Tensor,
        history: Tensor,
        hist_keep: Tensor,
        intent: Tensor | None = None,
        intent_mask: Tensor | None = None,
    ) -> Tensor:
        """One DiT forward: f(x_t, t | h, I) -> x0_hat (B, d).

        x_t: (B, d); t: (B,); history: (B, history_len) item ids (0 = padding);
        hist_keep: (B,) bool, False = history dropped (null history token);
        intent: (B, d) or None; intent_mask: (B,) bool, False = null intention.
        """
        hist_mask = (history != 0) & hist_keep[:, None]  # (B, L)
        return self.dit(x_t, t, self.item_vecs(history), hist_mask, intent, intent_mask)

    def _condition(self, batch: dict[str, Tensor]) -> Tensor:
        return self._history(batch["history"])

    def _denoise_targets(self, history, x_t, t, hist_keep, intent, intent_mask, copies: int = 1) -> Tensor:
        return self.denoise(x_t, t, history.repeat(copies, 1), hist_keep, intent, intent_mask)

    def _branches(self, parts: list[tuple[Tensor, bool, bool]], x_t, t, history, intent) -> list[Tensor]:
        """Stack the branches (rows, hist_keep, intent_on) into one batched DiT forward (in chunks of
        sample_chunk rows: rows are independent) and split the result back: one (len(rows), d) each."""
        dev = x_t.device
        idx = torch.cat([rows for rows, _, _ in parts])
        keep = torch.cat([torch.full((r.numel(),), k, dtype=torch.bool, device=dev) for r, k, _ in parts])
        use_i = torch.cat([torch.full((r.numel(),), i, dtype=torch.bool, device=dev) for r, _, i in parts])
        outs = []
        for c in range(0, idx.numel(), self.sample_chunk):
            sl = idx[c : c + self.sample_chunk]
            intent_c = None if intent is None else intent[sl]
            outs.append(
                self.denoise(x_t[sl], t[sl], history[sl], keep[c : c + sl.numel()], intent_c, use_i[c : c + sl.numel()])
            )
        return list(torch.cat(outs).split([rows.numel() for rows, _, _ in parts]))

    def _guided(self, x_t, t, history, intent, m: Tensor, w: float, rho: float) -> Tensor:
        """The conditional branches f(h,∅) and f(h,I) (the latter only for the rows that have an intention)
        share one batched DiT forward; the unconditional branch f(∅,∅) gets its own, on 4 tokens instead of
        L + 3 (its history is one null token): far less CPU time than stacking it with the others."""
        B, dev = x_t.shape[0], x_t.device
        a0 = 1.0 - w
        a1 = w - rho * m.to(x_t.dtype)  # (B,)
        rows_i = m.nonzero().squeeze(1) if rho != 0 else m.new_zeros(0, dtype=torch.long)
        all_rows = torch.arange(B, device=dev)

        x0 = torch.zeros_like(x_t)
        cond: list[tuple[Tensor, bool, bool]] = []
        if bool((a1 != 0).any()):
            cond.append((all_rows, True, False))  # f(h, ∅)
        if rows_i.numel() > 0:
            cond.append((rows_i, True, True))  # f(h, I)
        if cond:
            outs = self._branches(cond, x_t, t, history, intent)
            if bool((a1 != 0).any()):
                x0 = x0 + a1[:, None] * outs.pop(0)
            if rows_i.numel() > 0:
                x0 = x0.index_add(0, rows_i, rho * outs.pop(0))
        if a0 != 0:
            (f_uu,) = self._branches([(all_rows, False, False)], x_t, t, history, intent)  # f(∅, ∅)
            x0 = x0 + a0 * f_uu
        return x0


class CausalIDreamRec(IDreamRec):
    """Layout "causal" (recpipe.models.dit.CausalDiT): the history tokens are shared by all targets of a
    training window (one forward trains `window` targets) and by every guidance branch of a sampling step."""

    train_mode = "window"
    target_axis = 1

    def __init__(self, config: IDreamRecConfig, n_items: int, item_vectors: Tensor | None):
        super().__init__(config, n_items, item_vectors, window=config.window)
        self.dit = CausalDiT(copy=config.copy, **self._dit_size())

    def _condition(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """batch["window"]: (B, N) item ids, oldest first, 0 = padding; with C = batch["target"].shape[1],
        target g sits at slot N - C + g and sees the history before it. -> (history vectors (B, N, d),
        valid (B, N), anchor slots (B, C))."""
        window = batch["window"]
        (B, N), C = window.shape, batch["target"].shape[1]
        anchor = (N - C + torch.arange(C, device=window.device)).expand(B, C)
        return self.item_vecs(window), window != 0, anchor

    def _denoise_targets(self, cond, x_t, t, hist_keep, intent, intent_mask, copies: int = 1) -> Tensor:
        hist, valid, anchor = cond
        return self.dit(hist, valid, x_t, t, anchor.repeat(1, copies), hist_keep, intent, intent_mask)

    def _guided(self, x_t, t, history, intent, m: Tensor, w: float, rho: float) -> Tensor:
        """The branches with a non-zero coefficient are groups of ONE forward that reads the history once
        (f(∅,∅) looks at the null token only). (B, d)."""
        B, dev = x_t.shape[0], x_t.device
        use_i = rho != 0 and bool(m.any())
        # branches: (hist_keep, intent on, coefficient (B,))
        coef_h = w - rho * m.to(x_t.dtype) if use_i else torch.full((B,), w, dtype=x_t.dtype, device=dev)
        branches = []
        if 1.0 - w != 0:
            branches.append((False, False, torch.full((B,), 1.0 - w, dtype=x_t.dtype, device=dev)))
        if bool((coef_h != 0).any()):
            branches.append((True, False, coef_h))
        if use_i:
            branches.append((True, True, rho * m.to(x_t.dtype)))
        if not branches:
            return torch.zeros_like(x_t)
        G = len(branches)
        N = history.shape[1]
        hist_keep = torch.tensor([k for k, _, _ in branches], device=dev).expand(B, G)
        on = torch.tensor([i for _, i, _ in branches], device=dev)[None] & m[:, None]  # (B, G)
        intent_g = None if not use_i else intent.float()[:, None].expand(B, G, -1)
        anchor = torch.full((B, G), N, dtype=torch.long, device=dev)
        x0 = torch.zeros_like(x_t)
        for c in range(0, B, self.sample_chunk):
            sl = slice(c, c + self.sample_chunk)
            h = history[sl]
            out = self.dit(self.item_vecs(h), h != 0, x_t[sl, None].expand(-1, G, -1),
                           t[sl, None].expand(-1, G), anchor[sl], hist_keep[sl],
                           None if intent_g is None else intent_g[sl], on[sl])  # (b, G, d)
            coef = torch.stack([cf[sl] for _, _, cf in branches], dim=1)  # (b, G)
            x0[sl] = (coef[..., None] * out).sum(dim=1)
        return x0
