"""Wide parity grid against diffusers' schedulers (PyTorch, CPU).

Every sampler configuration below runs on every beta schedule the project offers (linear, linear betas to 0.04,
scaled_linear, cosine = squaredcos_cap_v2, zero-terminal-SNR scaled_linear) x every timestep spacing x odd step
counts (3, 7, 15: below and at DPM-Solver's 15-step lower-order-final threshold) x eps / v prediction, with
the same analytic model, initial noise and per-step noise on both sides.

Tolerance per case: 1e-5 + 2^-24 * sigma_max (`parity_grid_lib.tolerance`). Schedules whose alphas_cumprod tail is
tiny (cosine 2.4e-9 -> sigma_max 2.0e4; linear to 0.04: 2.6e4) amplify one float32 rounding of the unit-scale
state by sigma_max; with the other schedules the bound is ~1e-5. A sampler that mis-reads those tails (e.g. floors
them to 2^-24, which gave errors of 0.1-0.5 and NaNs) is off by orders of magnitude more.

A failing cell reports every failing (spacing, steps, prediction) combination of its (config, schedule) item.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from parity_grid_lib import SCHEDULES, Case, DiffusersFailed, run_case  # noqa: E402

SPACINGS = ("leading", "trailing", "linspace")
STEPS = (3, 7, 15)
PREDS = ("epsilon", "v_prediction")

DPM = "DPMSolverMultistepScheduler"
# Karras grids of the multistep solvers ignore the spacing; on the cosine schedule with >= 7 steps their first two
# timesteps coincide (998, 998) and diffusers starts at the second one and runs off the end (IndexError /
# AssertionError): there only our result is checked (finite).
KARRAS = dict(spacing_free=True, karras_start=True)
UNI = "UniPCMultistepScheduler"


def _c(id, sampler, cls, kwargs=(), dkw=(), **kw):
  return Case(id=id, sampler=sampler, kwargs=tuple(kwargs), cls=cls, dkw=tuple(dkw), **kw)


CASES = [
    _c("ddpm", "ddpm", "DDPMScheduler", dkw=[("clip_sample", False)], noise="scheduling_ddpm", raw_ac=True),
    _c("ddim", "ddim", "DDIMScheduler", dkw=[("clip_sample", False)], raw_ac=True),
    # DPM-Solver++: orders 1-3, Karras sigmas, both final sigma types, lower_order_final, euler_at_final, heun.
    _c("dpmpp-1", "dpmpp", DPM, [("solver_order", 1)], [("solver_order", 1)]),
    _c("dpmpp-2m", "dpmpp_2m", DPM),
    _c("dpmpp-3m", "dpmpp", DPM, [("solver_order", 3)], [("solver_order", 3)]),
    _c("dpmpp-2m-karras", "dpmpp", DPM, [("use_karras_sigmas", True)], [("use_karras_sigmas", True)], **KARRAS),
    _c("dpmpp-3m-karras", "dpmpp", DPM, [("solver_order", 3), ("use_karras_sigmas", True)],
       [("solver_order", 3), ("use_karras_sigmas", True)], **KARRAS),
    _c("dpmpp-2m-sigma_min-no_lof", "dpmpp", DPM, [("final_sigmas_type", "sigma_min"), ("lower_order_final", False)],
       [("final_sigmas_type", "sigma_min"), ("lower_order_final", False)]),
    _c("dpmpp-2m-heun-euler_at_final", "dpmpp", DPM, [("solver_type", "heun"), ("euler_at_final", True),
                                                     ("final_sigmas_type", "sigma_min")],
       [("solver_type", "heun"), ("euler_at_final", True), ("final_sigmas_type", "sigma_min")]),
    # SDE-DPM-Solver++, orders 2-3 (noise fed to diffusers as variance_noise).
    _c("sde-dpmpp-2m-karras", "dpmpp", DPM, [("algorithm_type", "sde-dpmsolver++"), ("use_karras_sigmas", True)],
       [("algorithm_type", "sde-dpmsolver++"), ("use_karras_sigmas", True)], noise="variance_noise", **KARRAS),
    _c("sde-dpmpp-2m-heun", "dpmpp", DPM, [("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun")],
       [("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun")], noise="variance_noise"),
    _c("sde-dpmpp-3m-sigma_min", "dpmpp", DPM, [("solver_order", 3), ("algorithm_type", "sde-dpmsolver++"),
                                               ("final_sigmas_type", "sigma_min")],
       [("solver_order", 3), ("algorithm_type", "sde-dpmsolver++"), ("final_sigmas_type", "sigma_min")],
       noise="variance_noise"),
    # UniPC (bh1 / bh2, orders 2-3, Karras, sigma_min without lower_order_final, noise prediction, no corrector).
    # diffusers' bh1 and its noise-prediction form return NaN on a final step to sigma = 0 (B_h = -inf times a zero
    # correction; 0 * expm1(inf)), so those two run with final_sigmas_type="sigma_min" here.
    _c("unipc-2-bh2", "unipc", UNI),
    _c("unipc-3-bh1-sigma_min", "unipc", UNI, [("solver_order", 3), ("solver_type", "bh1"),
                                              ("final_sigmas_type", "sigma_min")],
       [("solver_order", 3), ("solver_type", "bh1"), ("final_sigmas_type", "sigma_min")]),
    _c("unipc-3-karras", "unipc", UNI, [("solver_order", 3), ("use_karras_sigmas", True)],
       [("solver_order", 3), ("use_karras_sigmas", True)], **KARRAS),
    _c("unipc-3-sigma_min-no_lof", "unipc", UNI, [("solver_order", 3), ("final_sigmas_type", "sigma_min"),
                                                 ("lower_order_final", False)],
       [("solver_order", 3), ("final_sigmas_type", "sigma_min"), ("lower_order_final", False)]),
    _c("unipc-2-noise_pred-no_corrector", "unipc", UNI, [("predict_x0", False), ("disable_corrector", (0, 2)),
                                                        ("final_sigmas_type", "sigma_min")],
       [("predict_x0", False), ("disable_corrector", [0, 2]), ("final_sigmas_type", "sigma_min")]),
    # Euler (plain, Karras), Euler ancestral, Heun (plain, Karras).
    _c("euler", "euler", "EulerDiscreteScheduler", [("use_karras_sigmas", False)], ve_state=True),
    _c("euler-karras", "euler", "EulerDiscreteScheduler", [("use_karras_sigmas", True)], [("use_karras_sigmas", True)],
       ve_state=True),
    _c("euler_ancestral", "euler_ancestral", "EulerAncestralDiscreteScheduler",
       noise="scheduling_euler_ancestral_discrete", sigma64=True, ve_state=True),
    _c("heun", "heun", "HeunDiscreteScheduler", zero_snr=False, ve_state=True),
    _c("heun-karras", "heun", "HeunDiscreteScheduler", [("use_karras_sigmas", True)], [("use_karras_sigmas", True)],
       zero_snr=False, ve_state=True),
    # LCM (its own 50-step distillation grid: no spacing option).
    _c("lcm", "lcm", "LCMScheduler", noise="scheduling_lcm", spacing=False, raw_ac=True),
]


def _items():
  for case in CASES:
    for sched in SCHEDULES:
      if sched == "zero_snr" and not case.zero_snr:
        continue
      yield pytest.param(case, sched, id=f"{case.id}-{sched}")


@pytest.mark.parametrize("case,sched", list(_items()))
def test_parity_grid(case, sched):
  fails, worst, skipped = [], (0.0, None), 0
  spacings = ("linspace",) if case.spacing_free else SPACINGS if case.spacing else ("-",)
  for spacing in spacings:
    for n in STEPS:
      for pred in PREDS:
        if sched == "zero_snr" and case.raw_ac and pred == "epsilon":
          continue  # x0 = (x - eps) / sqrt(alphas_cumprod[999] = 0): undefined on both sides
        try:
          ours, ref, tol, sigma_max, _ = run_case(case, sched, pred, spacing, n)
        except DiffusersFailed as e:
          assert case.karras_start and sched == "cosine", f"diffusers failed unexpectedly: {e.err!r}"
          assert np.all(np.isfinite(e.ours)) and np.abs(e.ours).max() > 0.1
          skipped += 1
          continue
        assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 1e-2, "a meaningful comparison"
        err = float(np.max(np.abs(ours - ref))) if np.all(np.isfinite(ours)) else float("inf")
        if err / tol >= worst[0]:
          worst = (err / tol, f"{spacing}/{n}/{pred}: {err:.2e} (tol {tol:.1e}, sigma_max {sigma_max:.3g})")
        if not err <= tol:
          fails.append(f"{spacing}/{n}/{pred}: max abs diff {err:.3g} > tol {tol:.3g} (sigma_max {sigma_max:.3g})")
  print(f"{case.id}/{sched}: worst err/tol {worst[0]:.3f} at {worst[1]}"
        + (f"; {skipped} cells where diffusers fails" if skipped else ""))
  assert not fails, f"{case.id} on {sched}: " + "; ".join(fails)
