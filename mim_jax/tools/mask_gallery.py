r"""Every registered mask generator's masks on the same images, in one PNG: look at masks before
training with them.

  python -m mim_jax.tools.mask_gallery --config=configs/mae_vit.py:runlocal --out=/tmp/masks.png

One row per generator of mim_jax/masking.py (masking.GENERATORS), each with the config's
`mask.ratio` and that generator's knobs (`config.mask.<name>`), on the first --images images of
the config's evaluation split; masked patches are grey. The top row is the images. A generator
whose constraints the config's patch grid cannot meet (e.g. BEiT's 16-patch blocks on a 4x4
grid) is left out, its error written under the rows, as are the model-scored generators
(masking.SCORED: HPM's hard patches, MaskAlign's teacher attention), whose masks depend on a
trained model's outputs; without them they would show uniform masks under a misleading name.
"""

import json

import jax
import matplotlib
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from absl import app
from absl import flags

from mim_jax import errors
from mim_jax import masking
from mim_jax import models
from mim_jax.data import pipeline
from mim_jax.evaluators import reconstruction

GREY = 128


def masked_rows(config: ml_collections.ConfigDict, images: np.ndarray, seed: int = 0
                ) -> dict[str, np.ndarray | str]:
  """{generator name: uint8 images [N, H, W, C] with its masked patches grey, or the error
  that keeps it off this grid}, every generator drawn with the same key."""
  patch = models.build_encoder(config).patch
  grid = (images.shape[1] // patch, images.shape[2] // patch)
  rows = {}
  for name in sorted(masking.GENERATORS):
    if name in masking.SCORED:
      rows[name] = f"{name}: drawn from {masking.SCORED[name]}, not from the rng alone"
      continue
    try:
      spec = masking.MaskSpec.from_config(config.mask, name=name)
      mask = masking.draw(jax.random.key(seed), len(images), grid, spec).mask
    except ValueError as error:
      rows[name] = str(error)
      continue
    pixels = np.repeat(np.repeat(np.asarray(mask).reshape((-1,) + grid), patch, 1), patch, 2)
    rows[name] = np.where(pixels[..., None] > 0, np.uint8(GREY), images)
  return rows


def figure(config: ml_collections.ConfigDict, count: int = 8, seed: int = 0
           ) -> tuple[matplotlib.figure.Figure, list[str]]:
  """The gallery as a matplotlib figure (the notebook shows it), and the generators drawn (not
  those that failed)."""
  inputs, _ = pipeline.eval_arrays(config, config.data.eval_split, max_examples=count)
  images = reconstruction.denormalise(inputs["image"], config.data.mean, config.data.std)
  rows = masked_rows(config, images, seed)
  drawn = {name: row for name, row in rows.items() if not isinstance(row, str)}
  fig, axes = plt.subplots(len(drawn) + 1, count, figsize=(1.2 * count, 1.3 * (len(drawn) + 2)),
                           squeeze=False)
  for ax_row, (name, row) in zip(axes, [("images", images)] + list(drawn.items())):
    for ax, image in zip(ax_row, row):
      ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0,
                vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
    ax_row[0].set_ylabel(name, fontsize=8)
  fig.suptitle(f"{config.method.name}, mask.ratio {config.mask.ratio}; grey = masked",
               fontsize=9)
  failed = [f"{name}: {row}" for name, row in rows.items() if isinstance(row, str)]
  fig.text(0.01, 0.005, "\n".join(failed), fontsize=7, va="bottom", wrap=True)
  fig.tight_layout(rect=(0, 0.03 * len(failed), 1, 1))
  return fig, list(drawn)


def write(config: ml_collections.ConfigDict, out: str, count: int = 8, seed: int = 0
          ) -> list[str]:
  """Writes the gallery PNG to `out`; returns the generators drawn."""
  fig, drawn = figure(config, count, seed)
  fig.savefig(out)
  plt.close(fig)
  return drawn


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  drawn = write(f.config, f.out, f.images, f.seed)
  print(f"wrote {f.out}: " + json.dumps(drawn))


if __name__ == "__main__":
  matplotlib.use("Agg")  # Files only: no display is needed. (Not at import: the notebook draws.)
  # Defined here, not at import, so importing this module next to other tools (tests, the
  # notebook) does not clash with their flags.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "An image config, e.g. "
                                  "configs/mae_vit.py:runlocal.", lock_config=False)
  flags.DEFINE_string("out", None, "Output PNG.")
  flags.DEFINE_integer("images", 8, "Images (columns).")
  flags.DEFINE_integer("seed", 0, "Key of the masks.")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main, flags_parser=errors.parse_flags)
