"""Procedural endoscopy-like frames with polyp masks, for tests, smoke runs and the demo clip.

NOT a substitute for real data: numbers measured on these frames say nothing about polyps.
They exist so that the pipeline (data -> train -> evaluate -> export -> viewer) can run
anywhere, fast, without patient images.

A frame is built in layers, all vectorised numpy/cv2:
  mucosa   pinkish-red base colour, blotchy low-frequency texture, fine grain
  folds    haustral folds around a dark lumen (or parallel wall folds), shaded as ridges
  vessels  thin dark-red random-walk branches under the surface
  polyps   0-2 star-shaped domes (height map -> normals -> Lambert + Blinn-Phong), own
           colour/texture, soft rim and a contact shadow so they read as raised
  specular wet-surface highlights on ridges and polyp tops
  camera   vignette (light source sits next to the lens), optional round field of view,
           slight defocus, sensor noise

`render_frame(rng, size)` gives one independent frame; `render_clip(n, size, seed)` renders a
larger scene once and moves a virtual camera over it (pan/zoom/roll, polyps entering and
leaving view, gentle lighting flicker). The CLI writes a PraNet-layout dataset.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

# Seed-stream tags: frames of train/test/clip never share random numbers.
_STREAM_TRAIN, _STREAM_TEST = 1, 2


# ---------------------------------------------------------------- noise helpers

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise, roughly N(0,1), smooth at the scale of `cell` pixels (bicubic-upsampled grid)."""
    cell = max(1, int(round(cell)))
    gh, gw = h // cell + 4, w // cell + 4
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)
    oy, ox = (int(v) for v in rng.integers(cell, 2 * cell, size=2))
    return big[oy:oy + h, ox:ox + w]


def _fractal(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Sum of value-noise octaves (cell, cell/2, ...), normalised to unit std."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for _ in range(octaves):
        out += amp * _smooth_noise(rng, h, w, cell)
        cell, amp = cell / 2, amp * 0.5
    return out / (out.std() + 1e-6)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ---------------------------------------------------------------- scene layers

def _mucosa(rng, h, w, unit):
    """Base colour (float RGB in [0,1]) and a per-pixel albedo texture."""
    base = np.array([0.84, 0.44, 0.38], np.float32) + rng.normal(0, [0.03, 0.03, 0.025]).astype(np.float32)
    blotch = _fractal(rng, h, w, unit / 3, 3)
    grain = _smooth_noise(rng, h, w, max(1.0, unit / 60))
    tint = _smooth_noise(rng, h, w, unit / 2)
    rgb = base[None, None, :] * (1 + 0.07 * blotch[..., None] + 0.03 * grain[..., None])
    # some regions redder (inflamed), some paler
    rgb += tint[..., None] * np.array([0.02, -0.03, -0.025], np.float32)
    return rgb, base


def _folds_and_depth(rng, h, w, unit, lumen_xy=None):
    """Multiplicative shading from folds and distance to the light, and a ridge map for highlights."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = _fractal(rng, h, w, unit / 2.5, 2)
    freq = rng.uniform(1.4, 2.6)
    if lumen_xy is not None or rng.random() < 0.6:
        # Looking down the colon: folds are rings around a dark lumen.
        if lumen_xy is None:
            lumen_xy = (rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h)
        lx, ly = lumen_xy
        r = np.hypot(xx - lx, yy - ly) / unit
        ang = np.arctan2(yy - ly, xx - lx)
        r_eff = r * (1 + 0.18 * warp + 0.1 * np.cos(3 * ang + rng.uniform(0, 6.3)))
        phase = 2 * np.pi * freq * np.log(r_eff + 0.12)
        lumen_r = rng.uniform(0.08, 0.16)
        depth = _smoothstep(lumen_r * 0.5, lumen_r * 3.5, r_eff) ** 1.3
        depth = 0.06 + 0.94 * depth
    else:
        # Looking at the wall: roughly parallel folds, one side nearer to the light.
        a = rng.uniform(0, np.pi)
        s = (xx * math.cos(a) + yy * math.sin(a)) / unit
        phase = 2 * np.pi * freq * 0.6 * s + 1.6 * warp
        ramp = (xx * math.cos(a + 1.3) + yy * math.sin(a + 1.3)) / max(h, w)
        depth = np.clip(0.7 + 0.45 * (ramp - ramp.mean()), 0.35, 1.0)
    wave = np.sin(phase)
    ridge = np.clip(wave, 0, 1) ** 2          # lit crest of a fold
    shadow = np.clip(-np.cos(phase - 0.9), 0, 1) ** 2.5  # soft crease just behind the crest
    strength = rng.uniform(0.5, 1.0)
    shade = depth * (1 + strength * (0.12 * ridge - 0.28 * shadow))
    return shade.astype(np.float32), (ridge * depth).astype(np.float32), depth.astype(np.float32)


def _vessels(rng, h, w, unit):
    """Thin branching random walks: a [0,1] map of vessel density."""
    layer = np.zeros((h, w), np.float32)
    n = int(rng.integers(0, 5))
    area_scale = (h * w) / float(unit * unit)
    n = int(round(n * area_scale))
    step = unit / 30
    for _ in range(n):
        stack = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * np.pi), int(rng.integers(25, 60)))]
        width = 1 if unit < 200 else 2
        while stack:
            x, y, a, length = stack.pop()
            pts = [(x, y)]
            for _ in range(length):
                a += rng.normal(0, 0.35)
                x, y = x + step * math.cos(a), y + step * math.sin(a)
                pts.append((x, y))
                if rng.random() < 0.04 and len(stack) < 6:
                    stack.append((x, y, a + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), length // 2))
            poly = (np.array(pts) * 16).astype(np.int32)  # 4 fractional bits for anti-aliasing
            cv2.polylines(layer, [poly], False, float(rng.uniform(0.4, 1.0)), width, cv2.LINE_AA, shift=4)
    return cv2.GaussianBlur(layer, (0, 0), 0.6 + unit / 400)


def _polyp(rng, h, w, centre, radius):
    """One polyp: (rho map, height map, height gradients x/y) as fields over the frame.

    rho < 1 is inside; the outline is an ellipse with low-order Fourier wobble so shapes vary
    from round to lobulated."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = centre
    ang = rng.uniform(0, np.pi)
    elong = rng.uniform(0.6, 1.0)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(ang) + dy * math.sin(ang)
    v = (-dx * math.sin(ang) + dy * math.cos(ang)) / elong
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        wobble += rng.uniform(0, 0.16 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(u, v) / (radius * wobble)
    # Height: dome (sessile) to bulb (pedunculated-ish seen from above); flat ones barely rise.
    profile = rng.uniform(0.4, 1.0)
    height = radius * rng.uniform(0.25, 0.9) * np.clip(1 - rho ** 2, 0, 1) ** profile
    # Lumpy surface: a little texture in the height too.
    height *= 1 + 0.08 * _smooth_noise(rng, h, w, max(2.0, radius / 3))
    gy, gx = np.gradient(height)
    return rho, height, gx, gy


def _shade_normals(gx, gy, light):
    """Lambert and Blinn-Phong terms for a height field lit from roughly the camera direction."""
    nz = 1.0 / np.sqrt(1 + gx * gx + gy * gy)
    nx, ny = -gx * nz, -gy * nz
    lx, ly, lz = light
    lambert = np.clip(nx * lx + ny * ly + nz * lz, 0, 1) / lz  # 1 on a flat surface
    hx, hy, hz = lx, ly, lz + 1.0
    hn = math.sqrt(hx * hx + hy * hy + hz * hz)
    spec = np.clip((nx * hx + ny * hy + nz * hz) / hn, 0, 1)
    return lambert, spec


def _polyp_centre(rng, h, w, depth, margin):
    """A centre away from the dark lumen: a polyp lost in the dark would teach "lumen = polyp"."""
    for _ in range(20):
        cx, cy = rng.uniform(margin, 1 - margin) * w, rng.uniform(margin, 1 - margin) * h
        if depth[int(cy), int(cx)] > 0.6:
            break
    return cx, cy


def _render_scene(rng, h, w, unit, n_polyps, lumen_xy=None, radius_range=(0.06, 0.3), margin=0.12):
    """Linear-ish float RGB scene (no camera effects) and its binary polyp mask.

    Polyp radii are drawn from `radius_range` x unit, centres within `margin` of the borders."""
    rgb, base = _mucosa(rng, h, w, unit)
    shade, ridge, depth = _folds_and_depth(rng, h, w, unit, lumen_xy)
    vessels = _vessels(rng, h, w, unit)
    rgb *= 1 - vessels[..., None] * rng.uniform(0.3, 0.6) * np.array([0.3, 0.75, 0.6], np.float32)

    light = np.array([rng.normal(0, 0.25), rng.normal(0, 0.25), 1.0])
    light /= np.linalg.norm(light)
    mask = np.zeros((h, w), bool)
    spec_map = np.zeros((h, w), np.float32)
    for _ in range(n_polyps):
        centre = _polyp_centre(rng, h, w, depth, margin)
        rho, height, gx, gy = _polyp(rng, h, w, centre, unit * rng.uniform(*radius_range))
        lambert, spec = _shade_normals(gx, gy, light)
        contrast = rng.uniform(0.15, 1.0)
        if rng.random() < 0.6:  # paler/yellowish (many adenomas) ...
            delta = np.array([0.03, 0.11, 0.08], np.float32)
        else:                   # ... or redder/darker than the mucosa
            delta = np.array([0.0, -0.12, -0.08], np.float32)
        p_tex = _fractal(rng, h, w, max(2.0, unit / 25), 2)  # finer, "pit pattern" texture
        p_rgb = (base + contrast * delta)[None, None, :] * (1 + 0.06 * p_tex[..., None])
        p_rgb = p_rgb * lambert[..., None]
        alpha = _smoothstep(1.06, 0.86, rho)[..., None]
        # contact shadow / ambient occlusion just outside the rim: the polyp looks raised
        ring = np.where(rho > 0.9, np.exp(-((rho - 0.98) / 0.12) ** 2), 0.0)
        rgb *= (1 - 0.25 * contrast * ring)[..., None]
        rgb = rgb * (1 - alpha) + p_rgb * alpha
        spec_map = np.maximum(spec_map, (spec ** rng.uniform(150, 400)) * (rho < 1))
        mask |= rho < 0.96
    rgb *= shade[..., None]

    # wet-surface highlights: sparse bright specks on fold crests, plus polyp tops
    speck = _smooth_noise(rng, h, w, max(1.0, unit / 45))
    specks = _smoothstep(1.5, 2.4, speck) * ridge ** 2
    highlight = np.clip(specks + 0.9 * spec_map, 0, 1)
    highlight = cv2.GaussianBlur(highlight, (0, 0), 0.5 + unit / 500)
    rgb = rgb * (1 - highlight[..., None]) + np.array([1.0, 0.98, 0.95], np.float32) * highlight[..., None] * 1.1
    return rgb.astype(np.float32), mask.astype(np.uint8)


def _camera(rng, rgb, vignette, round_fov, gain=1.0, blur=0.7, noise=0.012):
    """Lens/sensor effects in the camera frame: vignette, optional round FOV, defocus, noise.

    Returns (rgb uint8, visible bool HxW): polyp masks are cut to the visible field, as
    annotators do not mark what the black corners hide."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)) / math.sqrt(2)
    out = rgb * (gain * (1 - vignette * r ** 2))[..., None]
    if blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    out = out + rng.normal(0, noise, out.shape).astype(np.float32)
    visible = np.ones((h, w), bool)
    if round_fov:
        # Round field of view with dark corners, as in many colonoscopy frames.
        fov = _smoothstep(0.99, 0.95, r * math.sqrt(2) / 1.25)
        out *= fov[..., None]
        visible = fov > 0.5
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), visible


# ---------------------------------------------------------------- public API

def render_frame(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic frame: (rgb uint8 HxWx3, mask uint8 HxW in {0,1}); H = W = size.

    0, 1 or 2 polyps (15 % / 60 % / 25 %). Deterministic for the state of `rng`."""
    n_polyps = int(rng.choice([0, 1, 2], p=[0.15, 0.6, 0.25]))
    scene, mask = _render_scene(rng, size, size, size, n_polyps)
    rgb, visible = _camera(rng, scene, vignette=rng.uniform(0.25, 0.6), round_fov=rng.random() < 0.4,
                           gain=rng.uniform(0.9, 1.15), blur=rng.uniform(0.3, 0.9) * size / 256)
    return rgb, mask * visible


def render_clip(n_frames: int, size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `n_frames` (frame_rgb uint8 HxWx3, mask uint8 HxW in {0,1}) with smooth camera motion.

    A scene 3x the frame size is rendered once (a lumen, 3-5 polyps); a virtual camera pans,
    zooms and rolls over it along slow Lissajous paths (about 1-2 % of the frame per frame),
    so polyps drift into and out of view. Lighting gain flickers gently. Deterministic per seed.
    """
    rng = np.random.default_rng([seed, 3])
    scene_size = 3 * size
    n_polyps = int(rng.integers(3, 6))
    lumen = (scene_size * rng.uniform(0.4, 0.6), scene_size * rng.uniform(0.4, 0.6))
    scene, scene_mask = _render_scene(rng, scene_size, scene_size, size, n_polyps, lumen,
                                      radius_range=(0.08, 0.25), margin=0.1)
    mask_f = scene_mask.astype(np.float32)

    # Camera path: periods of ~150-400 frames regardless of n_frames, so speed does not depend on length.
    periods = rng.uniform(150, 400, size=5)
    phases = rng.uniform(0, 2 * np.pi, size=5)
    pan = 0.55 * size  # keeps the rotated, zoomed-out view inside the scene
    vignette, round_fov = rng.uniform(0.3, 0.5), rng.random() < 0.5
    flicker_phase = rng.uniform(0, 2 * np.pi, size=2)
    for t in range(n_frames):
        cx = scene_size / 2 + pan * math.sin(2 * np.pi * t / periods[0] + phases[0])
        cy = scene_size / 2 + pan * math.sin(2 * np.pi * t / periods[1] + phases[1])
        zoom = 1.0 + 0.2 * math.sin(2 * np.pi * t / periods[2] + phases[2])
        roll = 0.35 * math.sin(2 * np.pi * t / periods[3] + phases[3])
        # Affine map frame pixel (u, v) -> scene (x, y): centre + R(roll) * (p - size/2) / zoom.
        c, s = math.cos(roll) / zoom, math.sin(roll) / zoom
        half = size / 2
        m = np.array([[c, -s, cx - c * half + s * half],
                      [s, c, cy - s * half - c * half]], np.float32)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        view = cv2.warpAffine(scene, m, (size, size), flags=flags, borderMode=cv2.BORDER_REFLECT)
        view_mask = cv2.warpAffine(mask_f, m, (size, size), flags=flags, borderMode=cv2.BORDER_REFLECT)
        gain = 1.0 + 0.035 * math.sin(2 * np.pi * t / 23 + flicker_phase[0]) \
            + 0.02 * math.sin(2 * np.pi * t / 7.3 + flicker_phase[1])
        frame, visible = _camera(rng, view, vignette, round_fov, gain=gain, blur=0.5 * size / 256)
        yield frame, ((view_mask >= 0.5) & visible).astype(np.uint8)


def frame_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per (seed, split, index): frame i is the same whatever N is."""
    return np.random.default_rng([seed, stream, index])


# ---------------------------------------------------------------- dataset writer / CLI

def write_split(folder: Path, n: int, size: int, seed: int, stream: int, prefix: str) -> int:
    """Write n frames as folder/images/<prefix>_00000.jpg and folder/masks/<prefix>_00000.png (0/255).

    Returns the number of frames containing at least one polyp pixel."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    with_polyp = 0
    for i in range(n):
        rgb, mask = render_frame(frame_rng(seed, stream, i), size)
        name = f"{prefix}_{i:05d}"
        # JPEG like the real data; libjpeg output is deterministic for identical input.
        cv2.imwrite(str(folder / "images" / f"{name}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        cv2.imwrite(str(folder / "masks" / f"{name}.png"), mask * 255)
        with_polyp += int(mask.any())
    return with_polyp


def write_dataset(out: str | Path, n_train: int, n_test: int, size: int, seed: int = 0) -> Path:
    """A PraNet-layout synthetic dataset under `out` (TrainDataset/, TestDataset/Synthetic/)."""
    out = Path(out)
    write_split(out / "TrainDataset", n_train, size, seed, _STREAM_TRAIN, "train")
    if n_test > 0:
        write_split(out / "TestDataset" / "Synthetic", n_test, size, seed, _STREAM_TEST, "test")
    return out


def build_parser() -> argparse.ArgumentParser:
    from kdas_core.cli.conventions import Parser, add_deprecated_alias, nonnegative_int

    p = Parser(exit_codes=(0, 1, 2), 
        prog="python -m kdas_core.data.synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write a synthetic, endoscopy-like polyp dataset in the PraNet layout:\n\n"
            "  OUT/TrainDataset/images/train_00000.jpg   OUT/TrainDataset/masks/train_00000.png\n"
            "  OUT/TestDataset/Synthetic/images/test_00000.jpg   .../masks/test_00000.png\n\n"
            "Frames show textured mucosa with folds, a lumen, vessels, specular highlights and\n"
            "0-2 polyps; masks are PNG 0/255. Output is deterministic for a given --seed, and\n"
            "frame i does not depend on N (train 10 is a prefix of train 100).\n\n"
            "Use it for smoke tests, CI and demos only: scores on synthetic frames say nothing\n"
            "about real polyps. Real data (Kvasir-SEG, CVC-ClinicDB) lives outside the repo."
        ),
        epilog=(
            "examples:\n"
            "  python -m kdas_core.data.synthetic --out /tmp/synth --train 64 --test 16 --image-size 128\n"
            "  python -m kdas_core.train --data /tmp/synth ...      # any tool that takes a PraNet root\n"
            "  python -m kdas_core.evaluate --weights ckpt.safetensors --data /tmp/synth\n\n"
            "Python: kdas_core.data.synthetic.render_frame(rng, size) and\n"
            "render_clip(n_frames, size, seed) (a moving-camera clip for the viewer demo)."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (created; existing files with the same names are overwritten)")
    p.add_argument("--train", type=nonnegative_int, default=64, metavar="N", help="number of training frames (default: %(default)s)")
    p.add_argument("--test", type=nonnegative_int, default=16, metavar="N",
                   help="number of frames in TestDataset/Synthetic; 0 writes no test set (default: %(default)s)")
    p.add_argument("--image-size", dest="size", type=int, default=256, metavar="S",
                   help="frame side in pixels, square (default: %(default)s)")
    add_deprecated_alias(p, "--size", "--image-size", "size", type=int)
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed; same seed -> identical files (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    from kdas_core.cli.conventions import EXIT_USAGE

    args = build_parser().parse_args(argv)
    if args.size < 32:
        print(f"kdas_core.data.synthetic: error: --image-size must be at least 32 pixels, got {args.size}", file=sys.stderr)
        return EXIT_USAGE
    start = time.perf_counter()
    out = Path(args.out)
    n_pos = write_split(out / "TrainDataset", args.train, args.size, args.seed, _STREAM_TRAIN, "train")
    n_pos_test = 0
    if args.test > 0:
        n_pos_test = write_split(out / "TestDataset" / "Synthetic", args.test, args.size, args.seed, _STREAM_TEST, "test")
    print(f"wrote {args.train} train + {args.test} test frames of {args.size}x{args.size} to {out} "
          f"({n_pos}/{args.train} and {n_pos_test}/{args.test} with a polyp) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
