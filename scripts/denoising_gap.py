"""Is a latent diffusion model's UNet over- or under-fitted? Its denoising error, training subjects against held-out.

For the training subjects and the held-out ones (val + test), each scan is encoded (the latent mean the
UNet was trained on, scaled as in training) and noised at fixed timesteps with fixed noise; the script
prints the UNet's noise-prediction MSE under each subject's own measured condition (as in training)
and the held-out / training ratio per timestep (:func:`synth.evaluate.denoising_gap`).

A ratio near 1 at every timestep: the UNet generalises, and more training may help. A ratio well above 1
where the noise is moderate (t about 50-400 of 1000, where a brain's folding is decided): it has learnt
the training latents there, so more steps on the same subjects will not help; augmentation, regularisation,
more subjects or early stopping on this ratio may. (Part of any gap is the encoder's: it was trained on
the training scans too; the t = 10 ratio, where denoising is local, bounds that part.)

Usage::

    python scripts/denoising_gap.py --out /root/runs/gap.json [--model synthbrain-ldm-2mm] [--draws 4]

Run 2026-12-01 on ``synthbrain-ldm-2mm`` 0.4.0 (LDM card, "The prior is over-fitted"). Keep the latents
out of the repository; the JSON holds figures only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _common import diagnosis_parser, load_model_and_data  # noqa: E402


def main(argv=None) -> int:
    p = diagnosis_parser(__doc__)
    p.add_argument("--draws", type=int, default=4, help="noise draws per latent and timestep")
    p.add_argument("--timesteps", type=int, nargs="+", default=None, help="training timesteps (default 10 25 50 100 200 400 700)")
    args = p.parse_args(argv)
    if args.draws < 1:
        p.error(f"--draws must be at least 1, got {args.draws}")

    from synth.evaluate import GAP_TIMESTEPS, denoising_gap
    from synth.io import write_json

    gen, data = load_model_and_data(p, args)
    try:
        res = denoising_gap(gen, data, tuple(args.timesteps or GAP_TIMESTEPS), args.draws)
    except ValueError as exc:
        p.error(str(exc))
    print(f"{res['model']}: {res['n_train']} training, {res['n_heldout']} held-out subjects, {res['draws']} noise draws")
    print(f"{'t':>5s} {'training':>9s} {'held-out':>9s} {'held-out / training':>20s}")
    for t in res["timesteps"]:
        print(f"{t:5d} {res['train'][t]:9.4f} {res['heldout'][t]:9.4f} {res['ratio'][t]:20.2f}")
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
