"""History pool of generated images (Shrivastava et al. 2017), as used by CycleGAN, SIFA, SeUDA and TUNA-Net to
update discriminators with a history of fakes instead of only the latest ones (pool size 50 in the papers' code).

Deterministic: all randomness comes from one generator (a ``torch.Generator`` or a ``numpy.random.Generator``)
given to the pool, and ``state_dict()`` / ``load_state_dict()`` save and restore both the stored images and that
generator's state, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ImagePool"]


class ImagePool:
    """A buffer of up to ``size`` previously generated images.

    ``query(images)`` processes the batch image by image, in order:
    - while the pool holds fewer than ``size`` images, the image is stored and returned unchanged;
    - once full, with probability 0.5 a uniformly chosen stored image is returned and the new image takes its slot;
      otherwise the new image is returned and the pool is unchanged.
    ``size=0`` disables the pool (``query`` returns its input). Stored images are detached copies; returned images
    have the input's device and dtype (the result never carries gradient to the generator).

    Randomness: ``generator`` (torch or numpy); when omitted, a private ``torch.Generator`` seeded with ``seed``.
    ``state_dict()`` includes the generator's state; if you pass a generator that other code also draws from,
    restore with ``load_state_dict(state, restore_rng=False)`` and restore that generator yourself.
    """

    def __init__(
        self,
        size: int = 50,
        *,
        generator: torch.Generator | np.random.Generator | None = None,
        seed: int = 0,
    ):
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = int(size)
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        if not isinstance(generator, (torch.Generator, np.random.Generator)):
            raise TypeError(f"generator must be a torch.Generator or numpy.random.Generator, got {type(generator)}")
        self.generator = generator
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    # -- randomness ---------------------------------------------------------------------------------------------------

    def _uniform(self) -> float:
        g = self.generator
        if isinstance(g, torch.Generator):
            return float(torch.rand((), generator=g, device=g.device).item())
        return float(g.random())

    def _index(self) -> int:
        g = self.generator
        if isinstance(g, torch.Generator):
            return int(torch.randint(self.size, (), generator=g, device=g.device).item())
        return int(g.integers(self.size))

    # -- query --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch of the same shape as ``images`` (N, ...), mixing in stored images as described above."""
        if self.size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self._uniform() < 0.5:
                idx = self._index()
                out.append(self.images[idx].to(device=images.device, dtype=images.dtype))
                self.images[idx] = image.clone()
            else:
                out.append(image)
        return torch.stack(out, 0)

    # -- checkpointing ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Stored images (CPU copies, in slot order) and the generator's state."""
        g = self.generator
        if isinstance(g, torch.Generator):
            rng = {"kind": "torch", "state": g.get_state()}
        else:
            rng = {"kind": "numpy", "state": g.bit_generator.state}
        return {"size": self.size, "images": [im.detach().cpu().clone() for im in self.images], "rng": rng}

    def load_state_dict(self, state: dict[str, Any], *, restore_rng: bool = True) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"pool size mismatch: checkpoint has {state['size']}, this pool {self.size}")
        images = list(state["images"])
        if len(images) > self.size:
            raise ValueError(f"checkpoint holds {len(images)} images for a pool of size {self.size}")
        if restore_rng:
            rng = state["rng"]
            g = self.generator
            kind = "torch" if isinstance(g, torch.Generator) else "numpy"
            if rng["kind"] != kind:
                raise ValueError(f"checkpoint pool RNG is {rng['kind']}, this pool uses a {kind} generator")
            if kind == "torch":
                g.set_state(rng["state"])
            else:
                g.bit_generator.state = rng["state"]
        self.images = [im.clone() for im in images]
