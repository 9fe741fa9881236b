"""Prompt Diffusion: in-context learning with example image pairs (experiment "prompt_diffusion"; facts in
shared/papers/prompt_diffusion.md, B1-B7).

The vision-language prompt {text, example pair (source -> target), query} -> output:

* the example pair is concatenated on channels, **source first** (H x W x 6), and goes through one hint encoder
  (`controlnet_cond_embedding`, 6 in-channels); the query (H x W x 3) through a second one
  (`controlnet_query_cond_embedding`); both end in a zero-initialised conv and are summed with the ControlNet's
  conv_in(noisy input) (`models/controlnet.py`, `query_conditioning_channels=3`);
* the ControlNet (a copy of the base UNet's encoder + mid block, `init_controlnet_from_unet`) emits one residual
  per skip + the mid residual (13 for SD-1.5) through zero-initialised 1x1 convs; they are added to the
  **frozen** base UNet (a frozen weight, `load_frozen`), so at step 0 the model's output is the base UNet's
  exactly;
* trained: the whole ControlNet (optimiser group "controlnet"); with `config.prompt.sd_locked=False` (the
  released script's setting, B3) also the base UNet's decoder half (up blocks, conv_norm_out, conv_out) as
  params["decoder"] (group "decoder"), initialised from the base and merged over the frozen base at every call;
* hints are in [-1, 1] (uint8 / 127.5 - 1, the original repo's range; B2);
* CFG dropout, one uniform draw u per example (B4): u < 5%: text dropped (the empty caption); 5-10%: text and
  pair dropped; 10-15%: pair dropped only (the dropped pair is all zeros in the [-1, 1] hint space, i.e. mid
  grey: ours, the facts do not say what the release feeds); the query is never dropped. At sampling the
  unconditional branch keeps the pair and the query and swaps only the text for the empty (negative) prompt.

Tasks on the shapes world (`TASKS`, `task_views`): six seen ones drawn uniformly per example (B4) -- inverse
("inv_depth", "inv_edge", "inv_seg": example = (map, image), query = map, output = image, text = the caption of
the query's scene) and forward ("depth", "edge", "seg": example = (image, map), query = image, output = map,
text = "depth map" / "edge map" / "segmentation map"). The example pair always comes from a different scene than
the query. Unseen tasks (never trained, `UNSEEN_TASKS` with near / far): "inv_lowres" (near: the 4x low-res
image, nearest-upsampled -> image), "inv_masked" (near: the masked image -> image), "silhouette" (near: image ->
white-on-black foreground map, a new forward map type, text "silhouette map"), "inv_blob" (far: a new input map,
one disc of the object's colour at each object centre, radius extent/4 -> image), "colour_perm" (far: an image
-> image edit, the RGB channels rotated to GBR, which maps the palette onto itself; text = the caption of the
edited scene).

Maps as 3-channel images (uint8, hint range [-1, 1] after / 127.5 - 1; sheets and RMSE use [0, 1]):
depth: grey = 1 - depth (near = bright, background black, as MiDaS inverse depth shows it); edge: white edges on
black; segmentation: one colour per shape class (`SEG_PALETTE`, none of them an object colour), background black.

Evaluation (`evaluate`): per task, the output vs the ground truth, same initial noise per query for every task
and example: forward tasks (map outputs) RMSE on [0, 1] pixels (sqrt of the mean per-image MSE, B6); inverse
tasks (image outputs) the shapes FD between outputs and true images when `config.eval.shapes_fd_path` names a
trained shapes-FD network (`eval/shapes_fd.py`; otherwise not computed, and said so in the log and the
metrics' `shapes_fd_given` = 0), the parser's agreement of the output with the query map (segmentation IoU,
edge F1, foreground IoU for depth) and its class / binding scores against the scene, plus RMSE. The in-context
test: the same query images under (image, depth), (image, edge) and (image, seg) example pairs, with the task
text and with the empty text (where only the example tells the task): RMSE to each true map and how often the
nearest true map is the one the example asked for (`incontext_*`); and mismatched examples (`mismatch_*`: an
inverse task's map query under the forward example (image, map) of the same map type, the paper's failure
mode) against the matched numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.experiments import text_to_image as t2i
from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, require_files
from diffusion_jax.registry import check_choice

SEEN_TASKS = ("inv_depth", "inv_edge", "inv_seg", "depth", "edge", "seg")
# Unseen task -> how close it is to the training tasks (see the module docstring).
UNSEEN_TASKS = {"inv_lowres": "near", "inv_masked": "near", "silhouette": "near", "inv_blob": "far",
                "colour_perm": "far"}
TASKS = SEEN_TASKS + tuple(UNSEEN_TASKS)
# Tasks whose output is a map (scored by RMSE) and the fixed text of each (B1: "depth map", "hed map", ...).
FORWARD_TEXT = {"depth": "depth map", "edge": "edge map", "seg": "segmentation map", "silhouette": "silhouette map"}
# Inverse tasks whose query is a map the parser can compare an output image with: task -> (render key, kind).
QUERY_MAP_AGREEMENT = {"inv_seg": ("segmentation", "segmentation"), "inv_edge": ("edges", "edges"),
                       "inv_depth": ("foreground", "foreground")}
# One colour per shape class (circle, square, triangle, diamond, cross); none is a shapes-world object colour.
SEG_PALETTE = np.array([(0, 0, 0), (255, 128, 0), (128, 0, 255), (0, 128, 255), (128, 255, 0), (255, 0, 128)],
                       np.uint8)
# CFG dropout (B4): P(text only), P(text and pair), P(pair only); the query is never dropped.
DEFAULT_DROPOUT = (0.05, 0.05, 0.05)
DEFAULTS = dict(sd_locked=False, conditioning_scale=1.0, dropout=DEFAULT_DROPOUT, tasks=SEEN_TASKS,
                repeats=8, example_pair=True, pretrained_controlnet="")

_SAMPLE_FNS: Dict[Any, Any] = {}


@EXPORT_KINDS.register("prompt_diffusion_params")
def check_prompt_diffusion_export(path: str) -> None:
  require_files(path, ["prompt_diffusion.json", "params.safetensors", "controlnet/config.json"],
                "a Prompt Diffusion export (prompt_diffusion.json, params.safetensors, controlnet/)")


# ------------------------------------------------------------------------------------------- task views


def _grey3(v: np.ndarray) -> np.ndarray:
  return np.repeat(np.round(np.clip(v, 0.0, 1.0) * 255).astype(np.uint8)[..., None], 3, -1)


def depth_image(depth: np.ndarray) -> np.ndarray:
  """Depth map -> uint8 [H, W, 3]: grey 1 - depth (near bright, background black)."""
  return _grey3(1.0 - np.asarray(depth, np.float32))


def edge_image(edges: np.ndarray) -> np.ndarray:
  return _grey3(np.asarray(edges, np.float32))


def seg_image(seg: np.ndarray) -> np.ndarray:
  return SEG_PALETTE[np.asarray(seg, np.int64)]


def blob_image(scene, size: int) -> np.ndarray:
  """One disc of each object's colour at its centre (radius extent / 4), background black."""
  from diffusion_jax.data import shapes as S
  out = np.zeros((size, size, 3), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  for o in scene.objects:
    r = max(1.0, o.extent / 4)
    out[(xx - o.cx) ** 2 + (yy - o.cy) ** 2 <= r * r] = S.COLOURS[o.colour]
  return out


# Channel rotation of "colour_perm": new (R, G, B) = old (G, B, R); maps the palette onto itself.
_PERM = (1, 2, 0)


def permuted_scene(scene):
  """The scene whose render is `render(scene)["image"][..., [1, 2, 0]]` (each colour renamed accordingly)."""
  from diffusion_jax.data import shapes as S
  by_rgb = {tuple(int(v) for v in rgb): name for name, rgb in S.COLOURS.items()}
  objs = tuple(dataclasses.replace(o, colour=by_rgb[tuple(int(S.COLOURS[o.colour][i]) for i in _PERM)])
               for o in scene.objects)
  return S.Scene(objs, scene.image_size)


def task_views(task: str, scene, cfg) -> Dict[str, Any]:
  """The (source, target) uint8 [H, W, 3] images of one scene under `task`, and the text of a prompt whose query
  is this scene: {"source", "target", "text", "scene_out" (the scene the target shows)}."""
  from diffusion_jax.data import shapes as S
  check_choice("Prompt Diffusion task", task, TASKS)
  r = S.render(scene, cfg)
  img = r["image"]
  cap = S.caption(scene)
  maps = {"depth": depth_image(r["depth"]), "edge": edge_image(r["edges"]), "seg": seg_image(r["segmentation"]),
          "silhouette": _grey3((r["instances"] > 0).astype(np.float32))}
  if task in maps:  # forward: image -> map
    return {"source": img, "target": maps[task], "text": FORWARD_TEXT[task], "scene_out": scene}
  if task.startswith("inv_") and task[4:] in maps:
    return {"source": maps[task[4:]], "target": img, "text": cap, "scene_out": scene}
  if task == "inv_lowres":
    lo = r["lowres"]
    f = img.shape[0] // lo.shape[0]
    return {"source": np.repeat(np.repeat(lo, f, 0), f, 1), "target": img, "text": cap, "scene_out": scene}
  if task == "inv_masked":
    return {"source": r["masked_image"], "target": img, "text": cap, "scene_out": scene}
  if task == "inv_blob":
    return {"source": blob_image(scene, cfg.image_size), "target": img, "text": cap, "scene_out": scene}
  if task == "colour_perm":
    ps = permuted_scene(scene)
    return {"source": img, "target": np.ascontiguousarray(img[..., list(_PERM)]), "text": S.caption(ps),
            "scene_out": ps}
  raise AssertionError(task)


def assemble_prompt(task: str, query_scene, example_scene, cfg, example_task: Optional[str] = None,
                    ) -> Dict[str, Any]:
  """One vision-language prompt: {"example_source", "example_target"} from `example_scene` under `example_task`
  (default `task`), {"query", "target" (the ground truth), "text"} from `query_scene` under `task`."""
  q = task_views(task, query_scene, cfg)
  e = task_views(example_task or task, example_scene, cfg)
  return {"example_source": e["source"], "example_target": e["target"], "query": q["source"],
          "target": q["target"], "text": q["text"], "scene_out": q["scene_out"]}


def cfg_dropout(rng, batch: int, rates: Sequence[float] = DEFAULT_DROPOUT) -> Tuple[jax.Array, jax.Array]:
  """(drop_text, drop_pair) bool [B] from one uniform draw per example: u < p1 text only; p1 <= u < p1 + p2 text
  and pair; p1 + p2 <= u < p1 + p2 + p3 pair only (B4)."""
  p1, p2, p3 = (float(v) for v in rates)
  u = jax.random.uniform(rng, (batch,))
  drop_text = u < p1 + p2
  drop_pair = (u >= p1) & (u < p1 + p2 + p3)
  return drop_text, drop_pair


def hint(u8) -> jax.Array:
  """uint8 (or [0, 255] float) images -> the hint range [-1, 1]."""
  return jnp.asarray(u8, jnp.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- data


class PromptSource:
  """grain source of training / test prompts over a text-to-image cache of shapes scenes (ids, text states,
  objects). Item k: query scene k % N; its task drawn uniformly from `tasks` by (seed, k) (train) or
  tasks[k % len(tasks)] (test); the example pair from another scene drawn by (seed, k) (train) or scene
  (k + 1) % N (test). `repeats`: the train source is N * repeats long, so a scene meets several tasks and partners
  per epoch. Text: the query's caption (inverse tasks: its ids and cached text states) or the task's fixed text
  (`task_ids` / `task_hidden`, in the cache)."""

  def __init__(self, path: str, tasks: Sequence[str], image_size: int, seed: int, train: bool, repeats: int = 1,
               example_pair: bool = True):
    with open(os.path.join(path, "meta.json")) as fh:
      self.meta = json.load(fh)
    with open(os.path.join(path, "task_texts.json")) as fh:
      self.task_texts = json.load(fh)
    self.path, self.tasks, self.image_size = path, tuple(tasks), int(image_size)
    self.seed, self.train, self.repeats = int(seed), bool(train), int(repeats) if train else 1
    self.example_pair = bool(example_pair)
    self._arrays = None

  def arrays(self):
    if self._arrays is None:
      keys = list(self.meta["keys"]) + ["task_ids"] + (["task_hidden"] if "text_hidden" in self.meta["keys"] else [])
      self._arrays = {k: np.load(os.path.join(self.path, f"{k}.npy"), mmap_mode="r") for k in keys}
    return self._arrays

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_arrays"] = None
    return d

  @property
  def num_scenes(self) -> int:
    return int(self.meta["num"])

  def __len__(self) -> int:
    return self.num_scenes * self.repeats

  def pick(self, k: int) -> Tuple[str, int, int]:
    """(task, query scene, example scene) of item k."""
    n = self.num_scenes
    q = int(k) % n
    if self.train:
      rng = np.random.default_rng([self.seed, int(k), 17])
      task = self.tasks[int(rng.integers(len(self.tasks)))]
      e = (q + 1 + int(rng.integers(n - 1))) % n if n > 1 else q
    else:
      task = self.tasks[int(k) % len(self.tasks)]
      e = (q + 1) % n
    return task, q, e

  def __getitem__(self, k: int) -> Dict[str, Any]:
    task, q, e = self.pick(k)
    return make_item(self.arrays(), self.task_texts, task, q, e, self.image_size)


def make_item(arr, task_texts: Sequence[str], task: str, q: int, e: int, image_size: int,
              example_task: Optional[str] = None, null_text: bool = False, tokenize=None) -> Dict[str, Any]:
  """The host example of prompt (task, query scene q, example scene e) from cache arrays; `tokenize` (captions ->
  ids) is needed for texts the cache does not hold (colour_perm's edited caption)."""
  from diffusion_jax.data import shapes as S
  cfg = S.ShapesConfig(image_size=image_size)
  qs = S.Scene.from_array(np.asarray(arr["objects"][q]), image_size)
  es = S.Scene.from_array(np.asarray(arr["objects"][e]), image_size)
  p = assemble_prompt(task, qs, es, cfg, example_task)
  out = {"example_source": p["example_source"], "example_target": p["example_target"], "query": p["query"],
         "target": p["target"], "task": np.int32(TASKS.index(task)), "scene": np.int32(q)}
  text = p["text"]
  if null_text:
    text = ""
  if text in task_texts:
    j = task_texts.index(text)
    out["ids"] = np.asarray(arr["task_ids"][j], np.int32)
    if "task_hidden" in arr:
      out["text_hidden"] = np.asarray(arr["task_hidden"][j], np.float32)
  elif S.caption(qs) != text:  # colour_perm: the edited scene's caption is not cached
    if tokenize is None:
      raise KeyError(f"text {text!r} of task {task!r} is neither a cached caption nor a task text; pass tokenize")
    out["ids"] = np.asarray(tokenize([text])[0], np.int32)
  else:
    out["ids"] = np.asarray(arr["ids"][q], np.int32)
    if "text_hidden" in arr:
      out["text_hidden"] = np.asarray(arr["text_hidden"][q], np.float32)
  out["caption"] = f"[{task}] {text}"
  out["objects_out"] = p["scene_out"].to_array(int(np.asarray(arr["objects"]).shape[1]))
  return out


def _sheet_view(ex: Dict[str, Any]) -> Dict[str, Any]:
  """Test batches: the ground truth flattened (so the sheet reads example pair | query | output | ground truth)
  and the text states dropped (sampling encodes the ids)."""
  ex = dict(ex)
  t = np.asarray(ex.pop("target"))
  ex["target_flat"] = t.reshape(t.shape[:-3] + (-1,))
  ex.pop("text_hidden", None)
  ex.pop("objects_out", None)
  return ex


# ------------------------------------------------------------------------------------------- networks


def _pd_apply(control_module, unet_module, cond_scale: float, params, base, x, t, c):
  """The Prompt Diffusion prediction: c = {"ctx", "pair" [B, H, W, 6], "query" [B, H, W, 3]} (hints in [-1, 1])."""
  if "pair" in c:
    down, mid = control_module.apply({"params": params["controlnet"]}, x, t, c["ctx"], c["pair"],
                                     conditioning_scale=cond_scale, controlnet_query_cond=c["query"])
  else:  # CN-FT baseline: a plain ControlNet on the query
    down, mid = control_module.apply({"params": params["controlnet"]}, x, t, c["ctx"], c["query"],
                                     conditioning_scale=cond_scale)
  unet_params = {**base, **params["decoder"]} if "decoder" in params else base
  return unet_module.apply({"params": unet_params}, x, t, c["ctx"], down_block_additional_residuals=down,
                           mid_block_additional_residual=mid)


def decoder_keys(unet_params) -> List[str]:
  """The base UNet's decoder half: up_blocks_*, conv_norm_out, conv_out (trained when sd_locked=False)."""
  return sorted(k for k in unet_params if k.startswith("up_blocks_") or k in ("conv_norm_out", "conv_out"))


@EXPERIMENTS.register("prompt_diffusion")
class PromptDiffusionExperiment(t2i.TextToImageExperiment):
  """See the module docstring. Reuses the text-to-image base's host pieces (text encoder, tokenizer, VAE, schedule
  of the pipeline) and its cache of scenes, extended with the task texts."""
  export_kind = "prompt_diffusion_params"

  def __init__(self, config: ml_collections.ConfigDict, stages=None):
    if "pipeline" not in dict(stages or {}):
      raise ValueError("prompt_diffusion needs the pretrained base as stage 'pipeline' (kind sd_pipeline): a "
                       "diffusers directory, e.g. the export of configs/sd_shapes.py (config.stages.pipeline.config) "
                       "or --config.stages.pipeline.path=/path/to/stable-diffusion-v1-5.")
    super().__init__(config, stages)
    o = self.opts
    for t in o["tasks"]:
      check_choice("Prompt Diffusion training task (config.prompt.tasks)", t, TASKS)
    p = [float(v) for v in o["dropout"]]
    if len(p) != 3 or min(p) < 0 or sum(p) > 1:
      raise ValueError(f"config.prompt.dropout={o['dropout']} must be three rates (text only, text and pair, pair "
                       "only) >= 0 summing to at most 1.")
    if config.model.get("unet", ""):
      raise ValueError("prompt_diffusion puts a ControlNet on the base pipeline's UNet; leave config.model.unet "
                       "empty.")
    if config.data.name != "shapes":
      raise ValueError(f"config.data.name={config.data.name!r}: the Prompt Diffusion tasks are rendered by the "
                       "shapes world only (config.data.name='shapes'); other data sets need map annotators, "
                       "which are not wired.")
    if not o["example_pair"] and len(o["tasks"]) != 1:
      raise ValueError("config.prompt.example_pair=False is the per-task ControlNet baseline (CN-FT): give exactly "
                       f"one task in config.prompt.tasks, not {list(o['tasks'])}.")

  # -- settings --------------------------------------------------------------------------------------

  @functools.cached_property
  def opts(self) -> Dict[str, Any]:
    o = dict(DEFAULTS)
    given = self.config.get("prompt", None) or {}
    unknown = [k for k in given.keys() if k not in DEFAULTS]
    if unknown:
      raise ValueError(f"Unknown config.prompt keys {unknown}; valid: {sorted(DEFAULTS)}.")
    o.update({k: given[k] for k in given.keys()})
    o["tasks"] = tuple(o["tasks"])
    o["dropout"] = tuple(float(v) for v in o["dropout"])
    return o

  @property
  def cond_factor(self) -> int:
    """Hint resolution / UNet input resolution (8 for SD latents, the pixel patch in pixel space)."""
    return self.image_size // self.latent_shape[0]

  @functools.cached_property
  def control_config(self):
    from diffusion_jax.models.codi_adapter import cond_embedding_channels
    from diffusion_jax.models.controlnet import controlnet_config_from_unet
    widths = cond_embedding_channels(self.cond_factor)
    if not self.opts["example_pair"]:
      return controlnet_config_from_unet(self.unet_config, conditioning_channels=3,
                                         conditioning_embedding_out_channels=widths)
    return controlnet_config_from_unet(self.unet_config, conditioning_channels=6, query_conditioning_channels=3,
                                       conditioning_embedding_out_channels=widths)

  @functools.cached_property
  def control_module(self):
    from diffusion_jax.models.controlnet import ControlNetModel
    return ControlNetModel(self.control_config, dtype=self.dtype, remat=str(self.config.get("remat", "none")))

  def model_fn(self):
    """`f(params, base_params, x, t, c)` (a module-level function + static modules: hashable, one compile)."""
    return functools.partial(_pd_apply, self.control_module, self.unet, float(self.opts["conditioning_scale"]))

  def task_texts(self) -> List[str]:
    return [""] + sorted(set(FORWARD_TEXT.values()))

  # -- data ------------------------------------------------------------------------------------------

  def _request(self, split: str) -> Dict[str, Any]:
    req = super()._request(split)
    req["task_texts"] = self.task_texts()
    return req

  def _cache_dir(self, split: str) -> str:
    d = super()._cache_dir(split)
    return os.path.join(os.path.dirname(d), "pd_" + os.path.basename(d))

  def _build_cache(self, split: str, path: str, req: Dict[str, Any]) -> None:
    super()._build_cache(split, path, req)
    texts = self.task_texts()
    ids = self.host.tokenize(texts)
    np.save(os.path.join(path, "task_ids.npy"), ids.astype(np.int32))
    if req["cache_text"]:
      np.save(os.path.join(path, "task_hidden.npy"), self.host.encode(ids).astype(np.float16))
    with open(os.path.join(path, "task_texts.json"), "w") as fh:
      json.dump(texts, fh)

  def source(self, split: str) -> PromptSource:
    o = self.opts
    train = split == "train"
    return PromptSource(self.cache(split), o["tasks"] if (train or not o["example_pair"]) else SEEN_TASKS,
                        self.image_size, int(self.config.data.get("seed", 0)), train,
                        int(o["repeats"]), bool(o["example_pair"]))

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    d = self.config.data
    src = self.source(split)
    bs = int(d.batch_size) // shard_count
    if split != "train" and len(src) < bs:
      bs = len(src)
    return make_pipeline(src, [] if split == "train" else [_sheet_view], batch_size=bs, seed=seed,
                         shuffle=split == "train", num_epochs=None if split == "train" else 1,
                         num_workers=int(d.get("num_workers", 0)), prefetch=int(d.get("prefetch", 2)),
                         shard_index=shard_index, shard_count=shard_count, drop_remainder=split == "train")

  # -- frozen weights and init -----------------------------------------------------------------------

  def load_frozen(self):
    from diffusion_jax.pretrained import diffusers_io
    frozen = super().load_frozen()
    _, frozen["unet"] = diffusers_io.load_unet(self.stages["pipeline"], subfolder="unet")
    return frozen

  def pretrained_source(self):
    """`config.prompt.pretrained_controlnet`: a PromptDiffusionControlNetModel directory (the converted release)."""
    return str(self.opts["pretrained_controlnet"] or "") or None

  def load_params(self, abstract_params):
    """The released ControlNet (pretrained_source) as initial params; None: `init` builds it from the base."""
    path = self.pretrained_source()
    if path is None:
      return None
    from diffusion_jax.pretrained import diffusers_io
    from diffusion_jax.pretrained.prompt_diffusion import load_prompt_diffusion_controlnet
    cfg, cn = load_prompt_diffusion_controlnet(path)
    if cfg != self.control_config:
      diff = [f.name for f in dataclasses.fields(cfg)
              if getattr(cfg, f.name) != getattr(self.control_config, f.name)]
      raise ValueError(f"The ControlNet at {path} does not match the base pipeline's UNet (fields {diff} differ); "
                       "use the base it was trained on (SD-1.5 for the release).")
    params = {"controlnet": cn}
    if not bool(self.opts["sd_locked"]):
      _, unet = diffusers_io.load_unet(self.stages["pipeline"], subfolder="unet")
      params["decoder"] = {k: unet[k] for k in decoder_keys(unet)}
    return params

  def init(self, rng, batch, frozen):
    from diffusion_jax.models.controlnet import init_controlnet_from_unet
    params = {"controlnet": init_controlnet_from_unet(frozen["unet"], self.control_config, rng)}
    if not bool(self.opts["sd_locked"]):
      params["decoder"] = {k: jax.tree.map(jnp.array, frozen["unet"][k]) for k in decoder_keys(frozen["unet"])}
    return params

  # -- the step --------------------------------------------------------------------------------------

  def _hints(self, batch, drop_pair=None):
    c = {"query": hint(batch["query"])}
    if self.opts["example_pair"]:
      pair = jnp.concatenate([hint(batch["example_source"]), hint(batch["example_target"])], -1)
      if drop_pair is not None:
        pair = jnp.where(drop_pair[:, None, None, None], 0.0, pair)
      c["pair"] = pair
    return c

  def _target_x0(self, frozen, target_u8, rng):
    from diffusion_jax.models.vae import encode_to_latents
    x = hint(target_u8)
    if self.latent:
      return encode_to_latents(frozen["vae"], self.host.vae_config, x, rng, dtype=self.dtype)
    return t2i.to_model_space(x, self.pixel_patch)

  def loss(self, params, frozen, ema, batch, rng, step):
    from diffusion_jax.core.losses import diffusion_loss
    k_drop, k_lat, k_loss = jax.random.split(rng, 3)
    b = batch["ids"].shape[0]
    drop_text, drop_pair = cfg_dropout(k_drop, b, self.opts["dropout"])
    if not self.opts["example_pair"]:
      drop_text = jax.random.bernoulli(k_drop, sum(self.opts["dropout"][:2]), (b,))
    ctx = jax.lax.stop_gradient(self._context(frozen, batch, drop_text))
    x0 = jax.lax.stop_gradient(self._target_x0(frozen, batch["target"], k_lat)).astype(jnp.float32)
    c = dict(self._hints(batch, drop_pair), ctx=ctx)
    model, base, dtype = self.model_fn(), frozen["unet"], self.dtype
    fn = lambda x, t, cc: model(params, base, x.astype(dtype), t, cc)
    per_ex, aux = diffusion_loss(fn, x0, k_loss, schedule=self.schedule, prediction_type=self.prediction_type,
                                 cond=c)
    f32 = lambda v: jnp.mean(v.astype(jnp.float32))
    return jnp.mean(per_ex), {"mse": jnp.mean(aux["mse"]), "drop_text": f32(drop_text), "drop_pair": f32(drop_pair)}

  # -- sampling --------------------------------------------------------------------------------------

  def pd_sample_fn(self, sampler: str, steps: int, guided: bool):
    """The jitted `(params, frozen, ids, example_source, example_target, query, x_T, guidance) -> [B, H, W, 3] in
    [0, 1]` (uint8 images in; CFG swaps only the text for the empty prompt)."""
    from diffusion_jax.core import samplers
    sched, opts = self.schedule_settings(sampler)
    model = self.model_fn()
    key = (model.args, self.host.text_module, self.host.vae_config, self.pixel_patch, sampler, int(steps),
           bool(guided), bool(self.opts["example_pair"]), json.dumps(sched, sort_keys=True),
           json.dumps(dict(opts), sort_keys=True, default=str))
    if key in _SAMPLE_FNS:
      return _SAMPLE_FNS[key]
    schedule = t2i.make_schedule_from(sched)
    pt = sched["prediction_type"]
    text_module, latent, vae_cfg, dtype, patch = (self.host.text_module, self.latent, self.host.vae_config,
                                                   self.dtype, self.pixel_patch)
    hints = self._hints

    def fn(params, frozen, ids, src, tgt, query, x_T, guidance):
      from diffusion_jax.models.vae import decode_latents
      ctx = t2i._text_states(text_module, frozen["text"], ids).astype(jnp.float32)
      c = dict(hints({"example_source": src, "example_target": tgt, "query": query}), ctx=ctx)
      kw = dict(num_steps=int(steps), schedule=schedule, prediction_type=pt, cond=c, **opts)
      if guided:
        kw["uncond"] = dict(c, ctx=jnp.broadcast_to(jnp.asarray(frozen["null_text"], jnp.float32), ctx.shape))
        kw["guidance_scale"] = guidance
      denoise = jax.tree_util.Partial(model, params, frozen["unet"])
      x = samplers.sample(sampler, denoise, x_T, **kw)
      if latent:
        x = decode_latents(frozen["vae"], vae_cfg, x.astype(dtype), dtype=dtype)
      else:
        x = t2i.from_model_space(x, patch)
      return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    _SAMPLE_FNS[key] = jax.jit(fn)
    return _SAMPLE_FNS[key]

  def sample_images(self, params, frozen, batch, rng, *, x_T=None, sampler: Optional[str] = None,
                    steps: Optional[int] = None, guidance: Optional[float] = None):
    """Outputs [B, H, W, 3] in [0, 1] for a batch of prompts {"ids", "example_source", "example_target",
    "query"} (uint8); `x_T` defaults to a draw from `rng`."""
    s = self.config.sample
    sampler = sampler or str(s.get("sampler", "ddim"))
    steps = int(steps or s.get("steps", 25))
    guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
    ids = jnp.asarray(batch["ids"], jnp.int32)
    if x_T is None:
      x_T = jax.random.normal(jax.random.fold_in(rng, 1), (ids.shape[0],) + self.latent_shape, jnp.float32)
    fn = self.pd_sample_fn(sampler, steps, guidance != 1.0)
    return fn(params, frozen, ids, jnp.asarray(batch["example_source"]), jnp.asarray(batch["example_target"]),
              jnp.asarray(batch["query"]), jnp.asarray(x_T, jnp.float32), jnp.float32(guidance))

  def sample(self, params, frozen, batch, rng):
    out = {"output": np.asarray(self.sample_images(params, frozen, batch, rng))}
    if "target_flat" in batch:
      gt = np.asarray(batch["target_flat"])
      out["ground_truth"] = gt.reshape(gt.shape[0], self.image_size, self.image_size, 3)
    return out

  # -- evaluation ------------------------------------------------------------------------------------

  def eval_sets(self, num: int) -> Dict[str, Dict[str, Any]]:
    """name -> {"task", "example_task", "null_text"} of every evaluated prompt set (each over test scenes
    0..num-1, example pair from scene (i + 1) % num)."""
    e = self.config.eval
    sets: Dict[str, Dict[str, Any]] = {}
    if not self.opts["example_pair"]:
      t = self.opts["tasks"][0]
      return {t: {"task": t, "example_task": t, "null_text": False}}
    for t in SEEN_TASKS:
      sets[t] = {"task": t, "example_task": t, "null_text": False}
    for t in list(e.get("unseen", list(UNSEEN_TASKS)) or []):
      check_choice("unseen task (config.eval.unseen)", t, tuple(UNSEEN_TASKS))
      sets[t] = {"task": t, "example_task": t, "null_text": False}
    if bool(e.get("incontext", True)):
      for t in ("depth", "edge", "seg"):
        sets[f"notext_{t}"] = {"task": t, "example_task": t, "null_text": True}
      for t in ("inv_depth", "inv_edge", "inv_seg"):
        sets[f"mismatch_{t}"] = {"task": t, "example_task": t[4:], "null_text": False}
    return sets

  def _eval_batches(self, arr, task_texts, spec, num: int):
    items = [make_item(arr, task_texts, spec["task"], i, (i + 1) % num, self.image_size, spec["example_task"],
                       spec["null_text"], self.host.tokenize) for i in range(num)]
    return {k: np.stack([it[k] for it in items]) for k in items[0] if k != "caption"}, [it["caption"] for it in items]

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    """See the module docstring (metrics per task, the in-context and mismatch tests). Writes
    WORKDIR/samples/prompt_diffusion_eval.png: example source | example target | query | output | ground truth,
    two rows per task."""
    from diffusion_jax.data import shapes as S
    from diffusion_jax.eval import shapes_parser
    from diffusion_jax.images import sample_sheet, save_png
    src = self.source("test")
    arr = src.arrays()
    num = min(int(self.config.eval.get("num_examples", 100)), src.num_scenes)
    if num < 2:
      raise ValueError("config.eval.num_examples must be >= 2 (the example pair comes from another scene).")
    bs = min(int(self.config.eval.get("batch_size", 100)), num)
    guidance = self.config.eval.get("guidance", None)
    steps = self.config.eval.get("steps", None)
    fd = None
    fd_path = str(self.config.eval.get("shapes_fd_path", "") or "")
    if fd_path:
      from diffusion_jax.eval.shapes_fd import ShapesFD
      fd = ShapesFD(fd_path)
    else:
      logging.warning("prompt_diffusion evaluate: config.eval.shapes_fd_path is not given, so the shapes FD of the "
                      "image outputs is NOT computed (train one with scripts/shapes_fd.py train).")
    # One initial noise per query scene, shared by every task and example pair (the in-context test compares
    # outputs that differ only in the prompt).
    noise = np.asarray(jax.random.normal(rng, (num,) + self.latent_shape, jnp.float32))
    out: Dict[str, float] = {"shapes_fd_given": float(fd is not None)}
    outputs: Dict[str, np.ndarray] = {}
    sheet_rows: List[Tuple[Dict[str, np.ndarray], np.ndarray, List[str]]] = []
    scfg = S.ShapesConfig(image_size=self.image_size)
    query_scenes = [S.Scene.from_array(np.asarray(arr["objects"][i]), self.image_size) for i in range(num)]
    for name, spec in self.eval_sets(num).items():
      batch, captions = self._eval_batches(arr, src.task_texts, spec, num)
      imgs = []
      for start in range(0, num, bs):
        sl = {k: v[start:start + bs] for k, v in batch.items()}
        xt = noise[start:start + bs]
        k = len(xt)
        if k < bs:
          sl = {kk: np.concatenate([v, np.repeat(v[-1:], bs - k, 0)]) for kk, v in sl.items()}
          xt = np.concatenate([xt, np.repeat(xt[-1:], bs - k, 0)])
        imgs.append(np.asarray(self.sample_images(params, frozen, sl, rng, x_T=xt, guidance=guidance,
                                                  steps=steps))[:k])
      imgs = np.concatenate(imgs)
      outputs[name] = imgs
      truth = batch["target"].astype(np.float32) / 255.0
      task = spec["task"]
      out[f"{name}/rmse"] = rmse(imgs, truth)
      if task not in FORWARD_TEXT:  # image outputs
        u8 = np.round(imgs * 255).astype(np.uint8)
        scenes = [S.Scene.from_array(o, self.image_size) for o in batch["objects_out"]]
        sc = shapes_parser.score_all(u8, scenes)
        out[f"{name}/class_accuracy"] = float(sc["class_accuracy"])
        out[f"{name}/binding"] = float(sc["binding"])
        if task in QUERY_MAP_AGREEMENT:
          key, kind = QUERY_MAP_AGREEMENT[task]
          maps = []
          for s in query_scenes:
            r = S.render(s, scfg)
            maps.append(r["instances"] > 0 if key == "foreground" else r[key])
          out[f"{name}/map_agreement"] = shapes_parser.map_consistency(u8, np.stack(maps).astype(np.uint8), kind)
        if fd is not None:
          out[f"{name}/shapes_fd"] = float(fd.distance(imgs * 2 - 1, truth * 2 - 1))
      if spec["null_text"] is False and spec["task"] == spec["example_task"]:
        sheet_rows.append(({k: batch[k][:2] for k in ("example_source", "example_target", "query")}, imgs[:2],
                           captions[:2]))
        sheet_rows[-1][0]["ground_truth"] = batch["target"][:2]
    if bool(self.config.eval.get("incontext", True)) and self.opts["example_pair"]:
      out.update(incontext_scores(outputs, self.eval_truths(arr, num)))
    near = [t for t, v in UNSEEN_TASKS.items() if v == "near" and f"{t}/rmse" in out]
    far = [t for t, v in UNSEEN_TASKS.items() if v == "far" and f"{t}/rmse" in out]
    for tag, ts in (("near", near), ("far", far)):
      if ts:
        out[f"unseen_{tag}/rmse"] = float(np.mean([out[f"{t}/rmse"] for t in ts]))
    if workdir and sheet_rows:
      conds = {k: np.concatenate([r[0][k] for r in sheet_rows]) for k in ("example_source", "example_target",
                                                                           "query")}
      outs = {"output": np.concatenate([r[1] for r in sheet_rows]),
              "ground truth": np.concatenate([r[0]["ground_truth"] for r in sheet_rows])}
      conds["caption"] = np.array(sum((r[2] for r in sheet_rows), []))
      sheet = sample_sheet(conds, outs)
      if sheet is not None:
        save_png(os.path.join(workdir, "samples", "prompt_diffusion_eval.png"), sheet)
    return out

  def eval_truths(self, arr, num: int) -> Dict[str, np.ndarray]:
    """The true depth / edge / seg maps ([0, 1] float, 3 channels) of the test scenes 0..num-1."""
    from diffusion_jax.data import shapes as S
    scfg = S.ShapesConfig(image_size=self.image_size)
    out = {t: [] for t in ("depth", "edge", "seg")}
    for i in range(num):
      s = S.Scene.from_array(np.asarray(arr["objects"][i]), self.image_size)
      for t in out:
        out[t].append(task_views(t, s, scfg)["target"])
    return {t: np.stack(v).astype(np.float32) / 255.0 for t, v in out.items()}

  # -- export ----------------------------------------------------------------------------------------

  def export(self, params, frozen, directory: str) -> None:
    from diffusion_jax.pretrained import diffusers_io, io
    params = jax.device_get(params)
    os.makedirs(directory, exist_ok=True)
    io.save_state_dict(io.flatten(jax.tree.map(np.asarray, params)), os.path.join(directory, "params.safetensors"))
    io.write_json({"tasks": list(self.opts["tasks"]), "sd_locked": bool(self.opts["sd_locked"]),
                   "example_pair": bool(self.opts["example_pair"]), "image_size": self.image_size,
                   "hint_range": [-1.0, 1.0], "base_pipeline": os.path.abspath(self.stages["pipeline"]),
                   "prediction_type": self.prediction_type},
                  os.path.join(directory, "prompt_diffusion.json"))
    if self.opts["example_pair"]:  # diffusers' PromptDiffusionControlNetModel layout (the release's)
      from diffusion_jax.pretrained.prompt_diffusion import save_prompt_diffusion_controlnet
      save_prompt_diffusion_controlnet(os.path.join(directory, "controlnet"), self.control_config,
                                       params["controlnet"])
    else:
      diffusers_io.save_controlnet(os.path.join(directory, "controlnet"), self.control_config, params["controlnet"])
    if "decoder" in params:  # the base UNet with its trained decoder (what a released checkpoint holds)
      unet = {**jax.device_get(frozen["unet"]), **params["decoder"]}
      diffusers_io.save_unet(os.path.join(directory, "unet"), self.unet_config, unet)


def rmse(outputs: np.ndarray, truth: np.ndarray) -> float:
  """sqrt of the mean per-image MSE on [0, 1] pixels (the paper's evaluate_mse protocol, B6)."""
  mse = np.mean((np.asarray(outputs, np.float32) - np.asarray(truth, np.float32)) ** 2,
                axis=tuple(range(1, np.ndim(outputs))))
  return float(np.sqrt(np.mean(mse)))


def incontext_scores(outputs: Dict[str, np.ndarray], truths: Dict[str, np.ndarray]) -> Dict[str, float]:
  """The in-context test from the outputs of the same queries under (image, k) examples, k in depth / edge / seg,
  with the task text (`outputs[k]`) and with the empty text (`outputs["notext_" + k]`): per k the RMSE to the
  true k map (`own`) and to the other two (`other`); `correct` = fraction of queries whose output is nearest
  (per-image RMSE) to the true map of the example's task; `spread` = mean per-pixel |difference| between the
  outputs under different examples. Mismatch: `mismatch_<inv task>` outputs (forward example for a map query)
  against the matched `<inv task>` ones."""
  out: Dict[str, float] = {}
  ks = ("depth", "edge", "seg")
  for tag, prefix in (("text", ""), ("notext", "notext_")):
    if not all(prefix + k in outputs for k in ks):
      continue
    correct, own, other = [], [], []
    for k in ks:
      o = outputs[prefix + k]
      d = {j: np.sqrt(np.mean((o - truths[j]) ** 2, axis=(1, 2, 3))) for j in ks}
      best = np.argmin(np.stack([d[j] for j in ks]), 0)
      correct.append(np.mean(best == ks.index(k)))
      own.append(float(np.mean(d[k])))
      other.append(float(np.mean([np.mean(d[j]) for j in ks if j != k])))
      out[f"incontext_{tag}/{k}_rmse_own"] = own[-1]
      out[f"incontext_{tag}/{k}_rmse_other"] = other[-1]
    out[f"incontext_{tag}/correct"] = float(np.mean(correct))
    out[f"incontext_{tag}/rmse_own"] = float(np.mean(own))
    out[f"incontext_{tag}/rmse_other"] = float(np.mean(other))
    out[f"incontext_{tag}/spread"] = float(np.mean([np.mean(np.abs(outputs[prefix + a] - outputs[prefix + b]))
                                                    for a in ks for b in ks if a < b]))
  for t in ("inv_depth", "inv_edge", "inv_seg"):
    if f"mismatch_{t}" in outputs and t in outputs:
      out[f"mismatch/{t}_pixel_change"] = float(np.mean(np.abs(outputs[f"mismatch_{t}"] - outputs[t])))
  return out
