"""A log-linear latent-class model whose normalizer does not factorize: pairwise features on binary x.

For binary ``x`` in ``{0, 1}^D`` and a latent class ``z`` in ``{0, ..., K-1}``::

    p(x | z, W) = exp(W[z] . phi(x)) / Z_z(W),      Z_z(W) = sum_{x' in {0,1}^D} exp(W[z] . phi(x'))
    phi(x)      = (x_1, ..., x_D,  x_i x_j for every edge (i, j))

The unary part alone is :class:`~vi_lab.models.loglinear.BernoulliMixture`, whose
normalizer is a product over pixels. A product ``x_i x_j`` couples two pixels, so
``Z_z`` no longer splits into per-pixel sums: it is computed here by enumerating all
``|X| = 2^D`` configurations, in chunks (bounded memory) with a running log-sum-exp
(no overflow). That sum is the course notes' central cost ("trainable with EM if we can
efficiently enumerate X and Z"): one normalizer pass costs ``O(2^D K F)`` for
``F = D + E`` features, and EM's M-step pays it at every inner-optimizer evaluation.

The gradient of ``log Z_z`` is the model's expected feature vector ``E[phi(X) | z, W]``;
:func:`log_normalizer` computes it in the same chunked pass and hands it to autograd,
so the M-step gradient is literally "expected counts in the data minus expected counts
under the model" without keeping a ``(2^D, K)`` graph alive.

Which pixel pairs interact is a name in :data:`EDGES` (``"grid"``: the 4-neighbours of a
square patch; ``"all"``: every pair; ``"none"``: the factorized model) or an explicit
``(E, 2)`` index tensor. :func:`random_patches` cuts small binary patches out of images,
so MNIST can be fitted with an enumerable ``X``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from vi_lab.models.loglinear import LatentClassModel, Stats, starting_probabilities

#: the most pixels whose configurations are enumerated: 2^20 (about a million) per pass,
#: times K classes and F features, is already seconds per normalizer on a CPU
MAX_ENUMERATED_BITS = 20

#: configurations per chunk of the normalizer pass: bounds its (C, F) and (C, K) buffers
CONFIG_CHUNK = 8192

#: a model keeps phi(x) of all 2^D configurations when the table fits in this many bytes
#: (4x4 patches with all 120 pairs: 71 MB in float64); building it costs about as much as
#: the rest of a normalizer pass, so the cache halves an M-step's time
FEATURE_CACHE_BYTES = 2 ** 27


def grid_edges(d: int) -> torch.Tensor:
    """The 4-neighbour edges of a square ``s x s`` patch flattened row-major, shape ``(E, 2)``.

    :param d: the number of pixels ``s * s``.
    :raises ValueError: when ``d`` is not a perfect square.

    Example::

        grid_edges(9)  # 12 edges of a 3x3 patch: (0, 1), (0, 3), (1, 2), ...
    """
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"grid edges need a square patch: x_dim={d} is not a perfect square; "
                         "pass edges='all' or an explicit (E, 2) tensor")
    pairs = []
    for r in range(side):
        for c in range(side):
            i = r * side + c
            if c + 1 < side:
                pairs.append((i, i + 1))
            if r + 1 < side:
                pairs.append((i, i + side))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def all_pairs(d: int) -> torch.Tensor:
    """Every pair ``i < j`` of ``d`` pixels, shape ``(d (d - 1) / 2, 2)``."""
    return torch.combinations(torch.arange(d), 2).reshape(-1, 2)


#: named edge sets: name -> d -> (E, 2)
EDGES: dict[str, Callable[[int], torch.Tensor]] = {
    "grid": grid_edges,
    "all": all_pairs,
    "none": lambda d: torch.zeros(0, 2, dtype=torch.long),
}


def binary_configurations(d: int, start: int = 0, stop: int | None = None, *, dtype: torch.dtype = torch.float64,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Configurations ``start .. stop-1`` of ``{0, 1}^d`` as rows (bit ``i`` of the index is pixel ``i``).

    :param d: bits per configuration.
    :param start: first configuration index.
    :param stop: one past the last (default ``2^d``).
    :returns: ``(stop - start, d)`` tensor of 0/1 values.

    Example::

        binary_configurations(2)  # [[0, 0], [1, 0], [0, 1], [1, 1]]
    """
    stop = 2 ** d if stop is None else stop
    idx = torch.arange(start, stop, device=device)
    return ((idx[:, None] >> torch.arange(d, device=device)) & 1).to(dtype)  # (C, d)


def pairwise_features(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``phi(x) = (x, x_i x_j for (i, j) in edges)``, shape ``(..., D + E)``.

    :param x: binary ``(..., D)``.
    :param edges: ``(E, 2)`` pixel index pairs.
    """
    return torch.cat([x, x[..., edges[:, 0]] * x[..., edges[:, 1]]], dim=-1)


def configuration_features(d: int, edges: torch.Tensor, *, chunk: int = CONFIG_CHUNK, dtype: torch.dtype = torch.float64,
                           device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """``phi(x)`` of every ``x`` in ``{0,1}^d``, chunk by chunk: ``(C, d + E)`` tensors in configuration order.

    :param d: pixels.
    :param edges: ``(E, 2)``.
    :param chunk: configurations per chunk.
    """
    for start in range(0, 2 ** d, chunk):
        yield pairwise_features(binary_configurations(d, start, min(start + chunk, 2 ** d), dtype=dtype,
                                                      device=device), edges)


def _normalizer_pass(W: torch.Tensor, chunks: Iterable[torch.Tensor],
                     with_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    # a streaming log-sum-exp over the configurations: per class keep the running max m,
    # s = sum exp(score - m) and t = sum exp(score - m) phi, rescaled when m grows, so
    # nothing of size 2^D x K is ever held
    K, F = W.shape
    m = W.new_full((K,), -math.inf)
    s = W.new_zeros(K)
    t = W.new_zeros(K, F) if with_features else None
    for phi in chunks:  # (C, F)
        scores = phi @ W.T  # (C, K)
        m_new = torch.maximum(m, scores.max(0).values)
        scale = torch.exp(m - m_new)  # exp(-inf) = 0 on the first chunk
        e = torch.exp(scores - m_new)  # (C, K)
        s = s * scale + e.sum(0)
        if t is not None:
            t = t * scale[:, None] + e.T @ phi  # (K, F)
        m = m_new
    log_z = m + s.log()
    return log_z, (t / s[:, None] if t is not None else None)


class _LogNormalizer(torch.autograd.Function):
    """``log Z(W)`` per class with the exact gradient ``E[phi(X) | z, W]`` from the same pass."""

    @staticmethod
    def forward(ctx: Any, W: torch.Tensor, chunks: Callable[[], Iterable[torch.Tensor]]) -> torch.Tensor:
        log_z, expected = _normalizer_pass(W, chunks(), with_features=True)
        ctx.save_for_backward(expected)
        return log_z

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (expected,) = ctx.saved_tensors
        return grad[:, None] * expected, None  # d log Z_k / d W_k = E[phi | z = k]


def log_normalizer(W: torch.Tensor, edges: torch.Tensor, d: int, *, chunk: int = CONFIG_CHUNK,
                   chunks: Callable[[], Iterable[torch.Tensor]] | None = None) -> torch.Tensor:
    """``log Z_z(W) = log sum_{x in {0,1}^d} exp(W[z] . phi(x))`` by enumeration, shape ``(K,)``.

    Differentiable in ``W``: the backward pass uses the expected features that the
    forward pass computed alongside, never a graph over the ``2^d`` configurations.

    :param W: weights ``(K, d + E)``.
    :param edges: ``(E, 2)`` pixel pairs of the pairwise features.
    :param d: pixels.
    :param chunk: configurations per chunk.
    :param chunks: a callable returning the feature chunks to sum over instead of building
        them (:class:`PairwiseMixture` passes its cached table).

    Example::

        W = torch.randn(3, 9 + 12, dtype=torch.float64)
        log_normalizer(W, grid_edges(9), 9)  # (3,)
    """
    if chunks is None:
        def chunks() -> Iterator[torch.Tensor]:
            return configuration_features(d, edges, chunk=chunk, dtype=W.dtype, device=W.device)
    if torch.is_grad_enabled() and W.requires_grad:
        return _LogNormalizer.apply(W, chunks)
    return _normalizer_pass(W, chunks(), with_features=False)[0]


def random_patches(images: torch.Tensor, side: int, num: int, *, generator: torch.Generator,
                   image_shape: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """``num`` square patches cut at uniformly random images and positions, flattened row-major.

    :param images: ``(N, H * W)`` (binarize them first to get binary patches).
    :param side: patch side ``s``; the patches have ``s * s`` pixels.
    :param num: how many patches.
    :param generator: a seeded CPU generator (the same patches on every device).
    :param image_shape: ``(H, W)`` of an image.
    :returns: ``(num, side * side)`` on ``images``' device.

    Example::

        x = binarize(load_dataset("mnist", "train").images, "static", seed=0)
        patches = random_patches(x, 3, 20000, generator=torch.Generator().manual_seed(0))  # (20000, 9)
    """
    H, Wd = image_shape
    if images.dim() != 2 or images.shape[1] != H * Wd:
        raise ValueError(f"images must be (N, {H * Wd}) for image_shape {image_shape}, got {tuple(images.shape)}")
    if not 1 <= side <= min(H, Wd):
        raise ValueError(f"patch side must lie in [1, {min(H, Wd)}], got {side}")
    n = torch.randint(len(images), (num,), generator=generator)
    r = torch.randint(H - side + 1, (num,), generator=generator)
    c = torch.randint(Wd - side + 1, (num,), generator=generator)
    offsets = torch.arange(side)
    rows = (r[:, None] + offsets)[:, :, None]  # (num, s, 1)
    cols = (c[:, None] + offsets)[:, None, :]  # (num, 1, s)
    pixel = (rows * Wd + cols).reshape(num, side * side)  # (num, s*s) flat indices into an image
    return images[n.to(images.device)[:, None], pixel.to(images.device)]


class EnumeratedBinary(dist.TorchDistribution):
    """``p(x) = exp(w . phi(x)) / Z`` over ``{0, 1}^D`` with pairwise features, batched over ``w``.

    The distribution :meth:`PairwiseMixture.component` hands to Pyro: ``log_prob`` is
    exact (``Z`` given), ``sample`` enumerates the configurations.

    :param weights: ``(..., F)``; the batch shape is ``weights.shape[:-1]``.
    :param log_z: ``log Z`` for each weight vector, shape ``weights.shape[:-1]``.
    :param edges: ``(E, 2)``.
    :param x_dim: D.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, weights: torch.Tensor, log_z: torch.Tensor, edges: torch.Tensor, x_dim: int,
                 validate_args: bool | None = None) -> None:
        self.weights, self.log_z, self.edges, self.x_dim = weights, log_z, edges, x_dim
        super().__init__(weights.shape[:-1], torch.Size([x_dim]), validate_args=validate_args)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(x)
        return (pairwise_features(x.to(self.weights.dtype), self.edges) * self.weights).sum(-1) - self.log_z

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        configs = binary_configurations(self.x_dim, dtype=self.weights.dtype, device=self.weights.device)
        logits = self.weights @ pairwise_features(configs, self.edges).T  # (..., 2^D)
        idx = dist.Categorical(logits=logits).sample(sample_shape)
        return configs[idx]

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> "EnumeratedBinary":
        batch_shape = torch.Size(batch_shape)
        return EnumeratedBinary(self.weights.expand(batch_shape + self.weights.shape[-1:]),
                                self.log_z.expand(batch_shape), self.edges, self.x_dim)


class PairwiseMixture(LatentClassModel):
    """Binary ``x`` in ``{0,1}^D`` with unary and pairwise x class features, normalized by enumeration.

    ``log p(x | z) = W[z] . phi(x) - log Z_z(W)``, ``phi(x) = (x, x_i x_j for (i, j) in
    edges)``. The weights ``W`` ``(K, D + E)`` hold the unary weights in columns ``:D``
    and the pairwise weights after them. With ``edges="none"`` (or all pairwise weights
    zero) it is :class:`~vi_lab.models.loglinear.BernoulliMixture`, computed the slow way.

    :param num_classes: K.
    :param x_dim: D; at most :data:`MAX_ENUMERATED_BITS`, since ``log Z`` sums ``2^D`` terms.
    :param edges: a key of :data:`EDGES` or an ``(E, 2)`` tensor of pixel pairs.
    :param weights: starting ``W`` ``(K, D + E)``; zeros when None.
    :param prior: prior probabilities ``(K,)`` (the start when learned); uniform when None.
    :param learn_prior: learn the mixing weights.
    :param dtype: dtype of the parameters (float64: the normalizer sums up to a million terms
        and EM's monotonicity is checked to 1e-10).
    :param chunk: configurations per chunk of the normalizer pass.

    Example::

        model = PairwiseMixture(5, 9, edges="grid")     # 3x3 patches, 4-neighbour pairs
        result = vi_lab.em.em(model, patches, max_iters=50, restarts=2)
        model.log_marginal(test_patches).mean()         # exact nats per patch
    """

    def __init__(self, num_classes: int, x_dim: int, *, edges: str | torch.Tensor = "grid",
                 weights: torch.Tensor | None = None, prior: torch.Tensor | None = None, learn_prior: bool = True,
                 dtype: torch.dtype = torch.float64, chunk: int = CONFIG_CHUNK, name: str = "pairwise_mixture") -> None:
        device = weights.device if torch.is_tensor(weights) else None
        super().__init__(num_classes, prior=prior, learn_prior=learn_prior, dtype=dtype, name=name, device=device)
        if not isinstance(x_dim, int) or x_dim < 1:
            raise ValueError(f"x_dim must be a positive integer, got {x_dim!r}")
        if x_dim > MAX_ENUMERATED_BITS:
            raise ValueError(
                f"x_dim={x_dim} is too large to enumerate: the exact normalizer sums over |X| = 2^{x_dim} "
                f"= {2 ** x_dim:.3g} configurations per class and pass; the limit is x_dim <= {MAX_ENUMERATED_BITS} "
                f"(2^{MAX_ENUMERATED_BITS} = {2 ** MAX_ENUMERATED_BITS:,}). Use smaller patches (4x4 = 16 pixels), "
                "or BernoulliMixture, whose normalizer factorizes over pixels")
        if isinstance(edges, str):
            try:
                edges = EDGES[edges](x_dim)
            except KeyError:
                raise ValueError(f"unknown edges {edges!r}; valid: {sorted(EDGES)} or an (E, 2) tensor") from None
        edges = torch.as_tensor(edges, dtype=torch.long)
        if edges.dim() != 2 or edges.shape[1] != 2 or (edges.numel() and (
                edges.min() < 0 or edges.max() >= x_dim or (edges[:, 0] == edges[:, 1]).any())):
            raise ValueError(f"edges must be an (E, 2) tensor of distinct pixel pairs in [0, {x_dim}), "
                             f"got shape {tuple(edges.shape)}")
        if len(torch.unique(edges.sort(1).values, dim=0)) != len(edges):  # (i, j) twice, or (i, j) and (j, i)
            raise ValueError("edges must not repeat a pair (in either order): a repeated pair is two identical "
                             "features whose weights cannot be told apart")
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        device = self.prior_logits.device
        num_features = x_dim + len(edges)
        self.W = self._weight_parameter(weights, (num_classes, num_features),
                                        f"(num_classes, x_dim + num_edges) = ({num_classes}, {num_features})")
        self.register_buffer("edges", edges.to(device))
        self.x_dim, self.num_features, self.chunk = x_dim, num_features, chunk
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (the W it was computed at, log Z)
        self._table: torch.Tensor | None = None  # phi of all configurations, (2^D, F), built on first use

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def check_x(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.x_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a (B, {self.x_dim}) tensor of binary pixels, got {shape}")
        if not ((x == 0) | (x == 1)).all():
            raise ValueError("x is outside the observation space {0, 1}^D: binarize it first "
                             "(vi_lab.data.binarize(x, 'static') or 'threshold')")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)``, shape ``(B, D + E)``."""
        return pairwise_features(x.to(self.W.dtype), self.edges)

    def feature_chunks(self) -> Iterator[torch.Tensor]:
        """``phi(x)`` of every configuration, chunk by chunk: the cached table's slices when the
        table fits :data:`FEATURE_CACHE_BYTES`, else built on the fly."""
        W = self.W
        if 2 ** self.x_dim * self.num_features * W.element_size() > FEATURE_CACHE_BYTES:
            return configuration_features(self.x_dim, self.edges, chunk=self.chunk, dtype=W.dtype, device=W.device)
        table = self._table
        if table is None or table.dtype != W.dtype or table.device != W.device:
            table = self._table = torch.cat(list(configuration_features(
                self.x_dim, self.edges, chunk=self.chunk, dtype=W.dtype, device=W.device)))  # (2^D, F)
        return iter(table.split(self.chunk))

    def log_normalizer(self) -> torch.Tensor:
        """``log Z_z(W)`` for every class by enumerating ``{0,1}^D``, shape ``(K,)``.

        Without gradients (the E-step, scoring) the value is kept until ``W`` changes,
        so scoring a dataset chunk by chunk pays for one enumeration, not one per chunk.
        """
        if torch.is_grad_enabled() and self.W.requires_grad:
            return log_normalizer(self.W, self.edges, self.x_dim, chunks=self.feature_chunks)
        W = self.W.detach()
        # compared by value (O(K F), nothing next to the O(2^D K F) pass): a version counter
        # would miss edits through .data
        cached = self._cache[0] if self._cache is not None else None
        if cached is None or cached.shape != W.shape or cached.device != W.device or not torch.equal(cached, W):
            self._cache = (W.clone(), log_normalizer(W, self.edges, self.x_dim, chunks=self.feature_chunks))
        return self._cache[1]

    @torch.no_grad()
    def expected_features(self) -> torch.Tensor:
        """``E[phi(X) | z, W]`` for every class, shape ``(K, D + E)``: the M-step's model counts."""
        return _normalizer_pass(self.W, self.feature_chunks(), with_features=True)[1]

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.W.T - self.log_normalizer()  # (B, K)

    def component(self, z: torch.Tensor) -> EnumeratedBinary:
        return EnumeratedBinary(self.W[z], self.log_normalizer()[z], self.edges, self.x_dim)

    def expected_stats(self, x: torch.Tensor, resp: torch.Tensor) -> Stats:
        return {"counts": resp.sum(0), "features": resp.T @ self.features(x)}  # (K,), (K, F)

    def expected_log_lik(self, stats: Stats) -> torch.Tensor:
        # sum_k (S_k . W_k - N_k log Z_k): its gradient S_k - N_k E[phi | z = k] is the data's
        # expected feature counts minus the model's, the second term costing one enumeration
        return (stats["features"] * self.W).sum() - (stats["counts"] * self.log_normalizer()).sum()

    def reset_parameters(self, generator: torch.Generator, x: torch.Tensor | None = None) -> None:
        """Unary weights as :meth:`BernoulliMixture.reset_parameters` draws them
        (:func:`~vi_lab.models.loglinear.starting_probabilities`), pairwise weights zero.

        Every restart thus starts at a factorized model; the pairwise weights grow only as
        far as the data's pixel correlations pull them.
        """
        K, D = self.num_classes, self.x_dim
        with torch.no_grad():
            p = starting_probabilities(K, D, generator, x, self.W.dtype)
            self.W.zero_()
            self.W[:, :D] = torch.logit(p.clamp(0.05, 0.95)).to(self.W.device)

    @torch.no_grad()
    def log_prob_table(self) -> torch.Tensor:
        """``log p(x)`` of every configuration (index order of :func:`binary_configurations`), shape ``(2^D,)``."""
        configs = binary_configurations(self.x_dim, dtype=self.W.dtype, device=self.W.device)
        return self.log_marginal(configs)

    def _sample_given(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        configs = binary_configurations(self.x_dim, dtype=self.W.dtype, device=self.W.device)
        log_px_z = torch.cat([phi @ self.W.T for phi in self.feature_chunks()]) - self.log_normalizer()  # (2^D, K)
        probs = log_px_z.detach().exp().T.to(z.device)[z]  # (n, 2^D), on the generator's device
        return configs.to(z.device)[torch.multinomial(probs, 1, generator=generator).squeeze(-1)]


__all__ = ["CONFIG_CHUNK", "EDGES", "FEATURE_CACHE_BYTES", "MAX_ENUMERATED_BITS", "EnumeratedBinary", "PairwiseMixture", "all_pairs",
           "binary_configurations", "configuration_features", "grid_edges", "log_normalizer", "pairwise_features", "random_patches"]
