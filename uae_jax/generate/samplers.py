"""Fixed-grid ODE / SDE samplers and guidance for the flow-matching transport.

Sampling integrates dx/dt = v(x, t) from pure noise at t = 1 down the grid
  t_k = shift(1 - linspace(0, t1, num_points)),  t1 = 1 - 1/1000,
(`num_points` grid points = num_points - 1 steps; with the 16 x 16 x 768 shift the grid ends at
t = 0.0069, and the last state is the sample). Every sampler is a `lax.fori_loop` over the grid
inside whatever `jax.jit` the caller builds, so the batch stays sharded over the mesh.

ODE methods (fixed grid): 'euler' (1 evaluation per step), 'heun' (2: explicit trapezoid),
'rk4' (4: the 3/8-rule variant torchdiffeq uses for its fixed-grid 'rk4').
SDE method 'euler_maruyama': the reverse-time SDE with the same marginals,
  dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW,   score = -(x + (1 - t) v) / t
(for the linear path, eps = x + (1 - t) v and score = -eps / t), with a diffusion w(t) of the
given form; the last step adds no noise (its mean).

Guidance builds the velocity the samplers integrate from the model's conditional and
unconditional (null-class) passes, run separately so an inactive guidance is bit-exact:
  cfg:          v = v_u + s (v_c - v_u)   for t_min <= t <= t_max, else v_c
  autoguidance: v = v_g + s (v_m - v_g)   (v_g: a smaller / earlier guide model, same label)
Outside the interval the unconditional (or guide) pass is skipped (`lax.cond` on the step's t),
and scale 1 never runs it.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.generate import transport

ODE_METHODS = ("euler", "heun", "rk4")
SDE_METHODS = ("euler_maruyama",)
METHODS = ODE_METHODS + SDE_METHODS
DIFFUSION_FORMS = ("constant", "sigma", "linear", "sbdm", "decreasing", "increasing_decreasing")
NFE_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4, "euler_maruyama": 1}


def time_grid(num_points: int, alpha: float = 1.0, t1: float = transport.T1) -> np.ndarray:
  """The sampling grid: 1 - linspace(0, t1, num_points), then the time shift (float64)."""
  if num_points < 2:
    raise ValueError(f"a sampling grid needs at least 2 points, got {num_points}")
  t = 1.0 - np.linspace(0.0, t1, num_points, dtype=np.float64)
  return transport.shift_time(t, alpha) if alpha != 1.0 else t


# ------------------------------------------------------------------------------ ODE steps
def euler_step(f, t0, t1, x):
  """x + dt f(t0, x)."""
  return x + (t1 - t0) * f(t0, x)


def heun_step(f, t0, t1, x):
  """Explicit trapezoid: predictor at t1, average of both slopes."""
  dt = t1 - t0
  k1 = f(t0, x)
  k2 = f(t1, x + dt * k1)
  return x + 0.5 * dt * (k1 + k2)


def rk4_step(f, t0, t1, x):
  """Runge-Kutta 3/8 rule (torchdiffeq's fixed-grid 'rk4')."""
  dt = t1 - t0
  k1 = f(t0, x)
  k2 = f(t0 + dt / 3, x + dt * k1 / 3)
  k3 = f(t0 + 2 * dt / 3, x + dt * (k2 - k1 / 3))
  k4 = f(t1, x + dt * (k1 - k2 + k3))
  return x + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125


ODE_STEPS = {"euler": euler_step, "heun": heun_step, "rk4": rk4_step}


def integrate_ode(f: Callable, x, grid, method: str = "euler"):
  """Integrates dx/dt = f(t, x) over the fixed `grid` (t scalars); returns the last state."""
  if method not in ODE_STEPS:
    raise ValueError(f"ODE method {method!r}: expected one of {ODE_METHODS}")
  step = ODE_STEPS[method]
  grid = jnp.asarray(grid, x.dtype)
  body = lambda i, y: step(f, grid[i], grid[i + 1], y)
  return jax.lax.fori_loop(0, grid.shape[0] - 1, body, x)


# ------------------------------------------------------------------------------ SDE
def diffusion(t, form: str, norm: float = 1.0):
  """w(t) = g(t)^2 of the reverse SDE, one of DIFFUSION_FORMS."""
  if form == "constant":
    return norm * jnp.ones_like(t)
  if form == "sigma":
    return norm * t
  if form == "linear":
    return norm * (1.0 - t)
  if form == "sbdm":  # 2 sigma (sigma' - sigma alpha'/alpha) for alpha = 1 - t, sigma = t
    return norm * 2.0 * t / jnp.maximum(1.0 - t, 1e-3)
  if form == "decreasing":
    return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1.0) ** 2
  if form == "increasing_decreasing":
    return norm * jnp.sin(jnp.pi * t) ** 2
  raise ValueError(f"diffusion form {form!r}: expected one of {DIFFUSION_FORMS}")


def velocity_score(v, x, t):
  """Score of the linear path from its velocity: -(x + (1 - t) v) / t."""
  return -(x + (1.0 - t) * v) / jnp.maximum(t, 1e-6)


def integrate_sde(f: Callable, x, grid, rng, form: str = "sigma", norm: float = 1.0):
  """Euler-Maruyama on the reverse SDE over `grid`; the last step is noise-free."""
  grid = jnp.asarray(grid, x.dtype)
  n = grid.shape[0] - 1

  def body(i, y):
    t0, t1 = grid[i], grid[i + 1]
    h = t1 - t0                                   # negative: time runs toward the data
    v = f(t0, y)
    w = diffusion(t0, form, norm)
    drift = v - 0.5 * w * velocity_score(v, y, t0)
    noise = jax.random.normal(jax.random.fold_in(rng, i), y.shape, y.dtype)
    sigma = jnp.where(i < n - 1, jnp.sqrt(w * jnp.abs(h)), 0.0)
    return y + drift * h + sigma * noise

  return jax.lax.fori_loop(0, n, body, x)


# ------------------------------------------------------------------------------ guidance
@dataclasses.dataclass(frozen=True)
class Guidance:
  """Guidance settings: 'none' | 'cfg' | 'autoguidance', scale and transport-time interval."""
  mode: str = "cfg"
  scale: float = 1.0
  t_min: float = 0.0
  t_max: float = 1.0

  @property
  def active(self) -> bool:
    """False when the guided velocity is exactly the conditional one (no second pass)."""
    return self.mode != "none" and self.scale != 1.0


def guided_velocity(cond_fn: Callable, other_fn: Optional[Callable], g: Guidance) -> Callable:
  """f(t, x) for the samplers from `cond_fn(x, t_vec)` and the null-class / guide pass.

  `other_fn(x, t_vec)` is the unconditional model (cfg) or the guide model (autoguidance).
  """
  def f(t, x):
    t_vec = jnp.full((x.shape[0],), t, x.dtype)
    v_c = cond_fn(x, t_vec)
    if not g.active:
      return v_c
    guided = lambda: (lambda v_o: v_o + g.scale * (v_c - v_o))(other_fn(x, t_vec))
    return jax.lax.cond((t >= g.t_min) & (t <= g.t_max), guided, lambda: v_c)

  return f


def check(method: str, guidance: Guidance, diffusion_form: str = "sigma") -> None:
  """Raises ValueError for an unknown method, guidance mode, interval or diffusion form."""
  if method not in METHODS:
    raise ValueError(f"sampler {method!r}: expected one of {METHODS}")
  if guidance.mode not in ("none", "cfg", "autoguidance"):
    raise ValueError(f"guidance {guidance.mode!r}: expected none | cfg | autoguidance")
  if not 0.0 <= guidance.t_min <= guidance.t_max <= 1.0:
    raise ValueError(f"guidance interval [{guidance.t_min}, {guidance.t_max}] is not inside [0, 1]")
  if diffusion_form not in DIFFUSION_FORMS:
    raise ValueError(f"diffusion form {diffusion_form!r}: expected one of {DIFFUSION_FORMS}")


def sample(f: Callable, x_init, grid, method: str = "euler", rng=None, diffusion_form="sigma",
           diffusion_norm: float = 1.0):
  """Runs `method` from x_init (noise at t = grid[0]) over `grid`; returns the final state."""
  if method in ODE_METHODS:
    return integrate_ode(f, x_init, grid, method)
  if method == "euler_maruyama":
    return integrate_sde(f, x_init, grid, rng, diffusion_form, diffusion_norm)
  raise ValueError(f"sampler {method!r}: expected one of {METHODS}")
