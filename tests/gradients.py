"""Comparisons of two training steps by their gradients and by their updates relative to their size.

Parameters after a step cannot tell two steps apart: AdamW moves each entry by about lr·sign(g)
from fresh moments, and it is unchanged when every gradient is scaled alike. So the steps are
compared by their gradients before clipping, tensor by tensor, and by their updates measured
against the updates' own size."""

import jax
import numpy as np


def flat(tree) -> dict[str, np.ndarray]:
    """{'head/mlp_0/kernel': array} of a pytree, in float64."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    }


def relative_gaps(got, want) -> dict[str, float]:
    """||got - want|| / ||want|| per tensor (0 where both are 0)."""
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
    gaps = {}
    for key, w in want.items():
        size = np.linalg.norm(w)
        diff = np.linalg.norm(got[key] - w)
        gaps[key] = diff / size if size > 0 else diff
    return gaps


def assert_gradients_close(got, want, rtol: float) -> None:
    """Every tensor's gradient within `rtol` of the other's, relative to its norm; a tensor
    whose gradient in `want` is round-off as a whole (see `round_off`) must be within 1e-5 of
    the RMS of all gradients in `got`."""
    gaps = relative_gaps(got, want)
    noise = {key: np.all(entries) for key, entries in round_off(want).items()}
    got, want = flat(got), flat(want)
    rms = np.sqrt(np.mean(np.concatenate([g.ravel() ** 2 for g in want.values()])))
    bad = {
        key: f"{gap:.3g}"
        for key, gap in gaps.items()
        if (gap > rtol and not noise[key])
        or (noise[key] and np.sqrt(np.mean(got[key] ** 2)) > 1e-5 * rms)
    }
    assert not bad, f"gradients differ by more than {rtol} of their norm: {bad}"


def round_off(grads) -> dict[str, np.ndarray]:
    """Per tensor, the entries whose gradient is round-off (below 1e-6 of the RMS of all).

    Such gradients exist by symmetry (softmax cancels attention's key bias, a BatchNorm the
    biases before it); Adam scales their noise to updates of up to ±lr whose signs no two
    implementations share, so updates are compared elsewhere."""
    grads = flat(grads)
    rms = np.sqrt(np.mean(np.concatenate([g.ravel() ** 2 for g in grads.values()])))
    return {key: np.abs(g) < 1e-6 * rms for key, g in grads.items()}


def assert_updates_close(before, got, want, grads, rtol: float, noise: float = 1e-3) -> None:
    """The update `got - before` of every tensor within `rtol` of `want - before`, relative to
    that update's norm, on the entries whose gradient (`grads`, a pytree of the same
    structure) is not round-off and is above `noise` times the RMS of its tensor's gradient:
    where two paths' gradients differ by their rounding, the sign of a gradient that small is
    not determined, and fresh Adam turns it into an update of ±lr either way."""
    before, got, want = flat(before), flat(got), flat(want)
    noise_free = {key: ~entries for key, entries in round_off(grads).items()}
    grads = flat(grads)
    bad = {}
    for key, b in before.items():
        g = grads.get(key)
        keep = noise_free[key] & (np.abs(g) >= noise * np.sqrt(np.mean(g**2)))
        step_got, step_want = (got[key] - b)[keep], (want[key] - b)[keep]
        size = np.linalg.norm(step_want)
        gap = np.linalg.norm(step_got - step_want) / size if size > 0 else 0.0
        if gap > rtol or (size == 0 and np.any(step_got)):
            bad[key] = f"{gap:.3g}"
    assert not bad, f"updates differ by more than {rtol} of their norm: {bad}"
