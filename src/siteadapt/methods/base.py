"""The method contract: what one adaptation method (one file) declares, and nothing more.

A method is an ``nn.Module`` holding its networks. It declares
- ``Options``: a pydantic model of its settings (``methods.<name>`` in params.yaml; unknown keys are errors; the
  papers' ablations are flags here, never copies of the method),
- ``build_optimizers()``: named optimizers over its modules,
- ``train_step(batch)``: one iteration (forward passes, losses, and the updates in the paper's order through
  ``self.update(loss, *optimizer_names)``), returning named loss values,
- ``predict(images)``: segmentation logits (N, K, H, W), or class logits (N, K) when ``ctx.kind`` is
  ``classification``, for target images,
and may override ``prepare(source, target)`` (one-off set-up before the loop, e.g. loading the source segmenter) and
``extra_state`` / ``load_extra_state`` (non-parameter state such as image pools, for exact resume) and
``finish(source, target)`` (one-off step after the last iteration, before the model is saved: e.g. re-estimating
batch-norm statistics on the target's images).
``total_iterations`` is set by the train step before ``prepare`` (None in unit tests) for methods whose schedule
depends on the length of the run (learning-rate decay to 0, training phases).

It never owns the loop, the device, mixed precision, checkpoints or logging: :mod:`siteadapt.train.engine` does.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..errors import ConfigError


class MethodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations_factor: float = Field(1.0, gt=0, description="multiplies the profile's iteration count")


@dataclass(frozen=True)
class Context:
    """Facts about the task a method is built for (from params.yaml and the prepared data)."""

    n_classes: int  # including background
    image_size: int
    width: float
    in_channels: int = 1
    kind: str = "segmentation"
    class_weights: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    src_x: torch.Tensor  # (B, 1, H, W) in [-1, 1]
    src_y: torch.Tensor | None  # (B, H, W) long, or (B,) for classification
    tgt_x: torch.Tensor | None  # target images; never target labels, except for the supervised upper bound
    tgt_y: torch.Tensor | None = None


class Method(nn.Module):
    name: ClassVar[str] = "base"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_target_images: ClassVar[bool] = True  # adaptation methods see unlabeled target images
    trains_on_target_labels: ClassVar[bool] = False  # only upper-bound references (supervised, stl)
    needs_source_model: ClassVar[bool] = False  # starts from / uses the trained source segmenter
    trains: ClassVar[bool] = True  # False: nothing to optimise (e.g. noadapt, histmatch)
    pools: ClassVar[tuple[str, ...]] = ()  # attributes holding image pools (saved with the iteration for exact resume)
    site_statistics: ClassVar[bool] = False  # its batch-norm statistics belong to one site (AdaBN-like methods)

    def __init__(self, ctx: Context, options: MethodOptions | None = None):
        super().__init__()
        self.ctx = ctx
        self.opts = options if options is not None else self.Options()
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self.amp_dtype: torch.dtype | None = None  # set by the engine (bf16 on CUDA when AMP is on)
        self.total_iterations: int | None = None  # set by the train step (the run's iteration count)

    # ---- construction helpers -------------------------------------------------------------------------------------
    @classmethod
    def parse_options(cls, raw: dict | None, where: str, origins: dict[str, str] | None = None) -> MethodOptions:
        """Validate options; errors name ``<where>.<option>``, or ``<origins[option]>.<option>`` for an option that
        came from another params key (a task's ``method_options``)."""
        try:
            return cls.Options.model_validate(raw or {})
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                at = (origins or {}).get(str(err["loc"][0]), where) if err["loc"] else where
                msgs.append(f"{at}.{loc}: unknown key" if err["type"] == "extra_forbidden"
                            else f"{at}.{loc}: {err['msg']}")
            raise ConfigError("\n".join(msgs)) from None

    # ---- what a method implements ---------------------------------------------------------------------------------
    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def prepare(self, source, target, source_model: "Method | None" = None) -> None:
        """One-off set-up before training (data statistics, loading the source segmenter, ...)."""

    def finish(self, source, target) -> None:
        """One-off step after training and before the model is saved (runs for methods that do not train too)."""

    def train_step(self, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def reestimate_statistics(self, images: torch.Tensor) -> bool:
        """Methods whose model carries one site's batch-norm statistics (``site_statistics``: AdaBN, TENT,
        self-training with AdaBN, FDA) re-estimate them on ``images`` (N, 1, H, W) of another site and return True;
        the others change nothing and return False."""
        return False

    def for_site(self, images: torch.Tensor) -> "Method":
        """This model as it runs on a site whose images are ``images``: itself, or for a method with
        ``site_statistics`` a copy with its batch-norm statistics re-estimated on them (label-free; this model is
        left unchanged). The source-regression check measures an adapted model on the source site this way: the
        adapted weights normalised for the source, as they would be deployed there."""
        if not self.site_statistics:
            return self
        import copy

        m = copy.deepcopy(self)
        return m if m.reestimate_statistics(images) else self

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict_subject(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Logits for all slices of one subject (N, 1, H, W) -> (N, K, H, W). Methods that need the whole subject
        (e.g. histogram matching) override this; the default runs :meth:`predict` in batches."""
        return torch.cat([self.predict(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])

    def translations(self, src_x: torch.Tensor, tgt_x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image-translating methods return e.g. {"source -> target-like": G_t(src_x), "target -> source-like": ...}
        for the report's translated-image grids; others return nothing."""
        return {}

    def extra_state(self) -> dict:
        """Non-parameter state for exact resume: the image pools named in ``pools`` and the iteration counter."""
        if not self.pools:
            return {}
        return {n: getattr(self, n).state_dict() for n in self.pools} | {"iteration": self.iteration}

    def load_extra_state(self, state: dict) -> None:
        if not state or not self.pools:
            return
        for n in self.pools:
            getattr(self, n).load_state_dict(state[n])
        self.iteration = int(state["iteration"])

    # ---- services for train_step ----------------------------------------------------------------------------------
    def _d_update(self, name: str, D, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One LSGAN update of discriminator ``D`` (optimizer ``name``) from one forward pass on real and fake images
        concatenated (instance norm works per sample, so this equals two forward passes); needs ``self.disc_loss``."""
        b = real.shape[0]
        with self.autocast():
            out = D(torch.cat([real, fake]).detach())
        loss = self.disc_loss(out[:b], out[b:])
        self.update(loss, name)
        return loss

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def attach_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        self._optimizers = self.build_optimizers()
        return self._optimizers

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        dev = next(self.parameters()).device.type
        return torch.autocast(device_type=dev, dtype=self.amp_dtype)

    def update(self, loss: torch.Tensor, *names: str) -> None:
        """Back-propagate ``loss`` and step the named optimizers (their old gradients are discarded first, so a
        module only ever steps on the gradient of its own objective)."""
        for n in names:
            self._optimizers[n].zero_grad(set_to_none=True)
        loss.backward()
        for n in names:
            self._optimizers[n].step()

    @staticmethod
    @contextlib.contextmanager
    def frozen(*modules: nn.Module):
        """Turn off gradients of ``modules`` (e.g. a discriminator while its generator is updated)."""
        saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, r in saved:
                p.requires_grad_(r)


def adam(params, lr: float, beta1: float = 0.5, beta2: float = 0.999, weight_decay: float = 0.0):
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=lr, betas=(beta1, beta2),
                            weight_decay=weight_decay)


def scalars(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in d.items()}
