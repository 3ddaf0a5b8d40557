"""The shipped workflows (``workflows/*.json``) load in the real ComfyUI frontend, match the pack, and run.

Every workflow is loaded into ComfyUI's own frontend (served by the test server, in headless Chromium) the
way a user opens it, and converted to a prompt by the frontend's ``app.graphToPrompt()``. Then:

- no node type is missing and no node is flagged with errors;
- the converted prompt equals the definition in ``build_workflows.py`` input by input, by name (so a
  widget value that lands on another input, e.g. after an input was inserted, fails);
- every node, input name, link type and value exists in the server's ``/object_info`` (the pack as it
  is now), and every widget the frontend shows is an input of its node;
- the note names every file the workflow loads (and, for an RAE folder, every file in it);
- every PiD Decode gets its caption from PiD Caption on a Gemma-2 Load CLIP, with the text of the prompt
  the decoded latent was sampled with (or, without a prompt, a description of the picture; for a DINOv2
  latent an ImageNet class name, as the reference captions those);
- every PiD Decode's seed control is "fixed", as the frontend shows it and as the file stores it;
- the converted prompt runs to success on the CPU. Two kinds of change are made for that, and the test
  asserts that nothing else differs from the export:
  * loader nodes whose models cannot be made tiny from a file (UNETLoader, CheckpointLoaderSimple and
    the CLIP loaders) are replaced by the test pack's stand-ins, which build the same ComfyUI classes at
    toy widths (``tests/comfy/test_pack/tiny_loaders.py``) and have the same outputs; the Load CLIP of
    Gemma-2 (for PiD Caption) by ``PiDTestGemmaCLIP`` (``tests/comfy/test_pack/gemma_clip.py``), which
    loads a tiny Gemma-2 written under the same file name as Load CLIP with type lumina2 does;
  * the width and height of the empty-latent node are set to ``TEST_SIZE``: a tiny PiD network still
    takes minutes per picture at the exported 2048/4096 px on a CPU. PiD Decode keeps ``native 4x``, so
    the picture is 4x the latent's size, as exported.
  The RAE workflows have no empty latent: their latent's size is the RAE's, and they run as exported, at
  2048 px. PiD checkpoints (tiny networks in the official layout), the RAE folders (tiny encoders, decoders
  and statistics), the VAE (full size, random), the tiny Gemma-2 and Load Image's picture are real files,
  written by ``conftest.py``.

A workflow whose definition needs a newer ComfyUI than the server's (``needs_comfyui``: Flux.2 Klein needs 0.33)
is not loaded or run there: those tests skip it with that reason, and the ComfyUI 0.33 leg runs them.
"""

from __future__ import annotations

import copy
import json
import re
import sys

import pytest

BUILD = sys.modules["pid_build_workflows"]  # loaded by this folder's conftest.py
PID = BUILD.PID
WORKFLOW_PATHS = sorted(BUILD.WORKFLOWS_DIR.glob("*.json"))
NAMES = [p.stem for p in WORKFLOW_PATHS]

NOTE_TYPES = {"Note", "MarkdownNote"}
VIRTUAL_TYPES = NOTE_TYPES | {"PrimitiveNode", "Reroute"}  # frontend-only nodes, never sent to the server
FRONTEND_ONLY_WIDGETS = {"control_after_generate", "control_filter_list", "upload"}
FRONTEND_WIDGET_PREFIX = "$$"  # current frontends' own widgets, e.g. Load Image's "$$canvas-image-preview"

# Loader -> the test pack's stand-in (same output types, checked below).
STAND_INS = {
    "UNETLoader": "PiDTestTinyDiffusionModel",
    "CheckpointLoaderSimple": "PiDTestTinyCheckpoint",
    "CLIPLoader": "PiDTestTinyTextEncoder",
    "DualCLIPLoader": "PiDTestTinyTextEncoder",
    "TripleCLIPLoader": "PiDTestTinyTextEncoder",
}
# Which tiny family a loader stands for: by model file, or by the CLIP loader's type.
FAMILY_BY_FILE = {
    "flux1-dev.safetensors": "flux",
    "z_image_turbo_bf16.safetensors": "z_image",
    "flux2_dev_fp8mixed.safetensors": "flux2",
    "flux-2-klein-4b.safetensors": "flux2_klein",
    "qwen_image_fp8_e4m3fn.safetensors": "qwen_image",
    "sd_xl_base_1.0.safetensors": "sdxl",
    "sd3.5_large_fp8_scaled.safetensors": "sd3",
}
FAMILY_BY_CLIP_TYPE = {"flux": "flux", "lumina2": "z_image", "flux2": "flux2", "qwen_image": "qwen_image",
                       "sdxl": "sdxl", "sd3": "sd3"}  # fmt: skip
# Where one CLIP type takes several text encoders (ComfyUI tells them apart by the file's weights): by type and file.
FAMILY_BY_CLIP_FILE = {("flux2", "qwen_3_4b.safetensors"): "flux2_klein"}
# The stand-in for PiD Caption's Load CLIP of Gemma-2, which is told apart from Z-Image's Load CLIP (also type
# lumina2, qwen_3_4b) by its file name (is_gemma_clip).
GEMMA_STAND_IN = "PiDTestGemmaCLIP"
EMPTY_LATENTS = {"EmptyLatentImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage"}
TEST_SIZE = 64  # px of the empty latents in the run (Flux.2's /16 latent is then 4x4)
# Latents of an RAE: the side of the RAE's own (native) picture, and PiD's native factor on it (README, The nodes).
RAE_NATIVE_PX = {"dinov2": 512, "siglip": 256}
PID_NATIVE_FACTOR = {"dinov2": 4, "siglip": 8}  # 4 for every VAE latent
RUN_TIMEOUT = 900


# --- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def definitions() -> dict:
    return {w.name: w for w in BUILD.workflows()}


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.fixture(scope="session")
def loaded(frontend, definitions, comfy_server) -> dict:
    """name -> what the frontend made of workflows/<name>.json (loaded once per session, on first use). A test that
    asks for a workflow this server's ComfyUI is too old for is skipped, with the reason."""

    class Cache(dict):
        def __missing__(self, name):
            need = definitions[name].needs_comfyui
            if need and BUILD.version_tuple(comfy_server.comfyui_version) < BUILD.version_tuple(need.version):
                pytest.skip(f"{name}: {need.sentence}; this is ComfyUI {comfy_server.comfyui_version}")
            self[name] = frontend.check(json.loads((BUILD.WORKFLOWS_DIR / f"{name}.json").read_text()))
            return self[name]

    return Cache()


def workflow_params():
    return pytest.mark.parametrize("name", NAMES)


# --- helpers -----------------------------------------------------------------------------------------
def input_specs(info: dict) -> dict[str, tuple[list, bool]]:
    """input name -> (spec, required) from an /object_info entry."""
    specs = {}
    for section, required in (("required", True), ("optional", False)):
        for name, spec in info["input"].get(section, {}).items():
            specs[name] = (spec, required)
    return specs


def combo_options(spec: list) -> list | None:
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return spec[1].get("options", []) if len(spec) > 1 else []
    return None


def value_problem(value, spec: list, check_options: bool) -> str | None:
    kind, options = spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = combo_options(spec)
    if choices is not None:
        if not isinstance(value, str):
            return f"{value!r} is not an option name"
        return None if not check_options or value in choices else f"{value!r} is not one of {choices[:12]}"
    if kind == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{value!r} is not an INT"
    if kind == "FLOAT" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return f"{value!r} is not a FLOAT"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a STRING"
    if kind not in ("INT", "FLOAT", "BOOLEAN", "STRING"):
        return f"a value ({value!r}) is given for the {kind} socket"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{value} is below the minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{value} is above the maximum {options['max']}"
    return None


def family_of(node: dict) -> str:
    inputs = node["inputs"]
    if node["class_type"] in ("UNETLoader", "CheckpointLoaderSimple"):
        key, table = inputs.get("unet_name", inputs.get("ckpt_name")), FAMILY_BY_FILE
    elif (inputs["type"], inputs.get("clip_name")) in FAMILY_BY_CLIP_FILE:
        key, table = (inputs["type"], inputs["clip_name"]), FAMILY_BY_CLIP_FILE
    else:
        key, table = inputs["type"], FAMILY_BY_CLIP_TYPE
    assert key in table, f"no tiny model family for {node['class_type']} {key!r}: add it to this test's tables"
    return table[key]


def is_gemma_clip(node: dict) -> bool:
    return node["class_type"] == "CLIPLoader" and node["inputs"]["clip_name"] == BUILD.GEMMA_FILE


def stand_in(node: dict) -> dict:
    """The test pack's node that replaces the loader ``node`` in the run."""
    if is_gemma_clip(node):  # the tiny Gemma-2 that conftest.py wrote under the same name
        return {"class_type": GEMMA_STAND_IN, "inputs": {"clip_name": node["inputs"]["clip_name"]}}
    return {"class_type": STAND_INS[node["class_type"]], "inputs": {"family": family_of(node), "seed": 0}}


def run_prompt(prompt: dict) -> tuple[dict, set[str], set[str]]:
    """The prompt the run uses, and the ids of the replaced loaders and resized empty latents."""
    run = copy.deepcopy(prompt)
    replaced, resized = set(), set()
    for node_id, node in run.items():
        if node["class_type"] in STAND_INS:
            run[node_id] = stand_in(node)
            replaced.add(node_id)
        elif node["class_type"] in EMPTY_LATENTS:
            node["inputs"].update(width=TEST_SIZE, height=TEST_SIZE)
            resized.add(node_id)
    return run, replaced, resized


def checkpoint_space(loader: dict) -> str:
    """The latent space of the released checkpoint a Load PiD Decoder loads (named by its official folder)."""
    from pid_core.config import RELEASED_CHECKPOINTS

    folder = loader["inputs"]["pid_name"].split("/")[0]
    (released,) = [c for c in RELEASED_CHECKPOINTS if c.experiment == folder]
    return released.space.value


def image_size(prompt: dict, ref: list, picture: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in px of the IMAGE output ``ref`` will have in the run."""
    node = prompt[ref[0]]
    cls, inputs = node["class_type"], node["inputs"]
    if cls == f"{PID}Decode":
        assert inputs["size"] == "native 4x", "the run expects PiD Decode's native size"
        factor = PID_NATIVE_FACTOR.get(checkpoint_space(prompt[inputs["pid_decoder"][0]]), 4)
        width, height = latent_size(prompt, inputs["latent"], picture)
        return factor * width, factor * height
    if cls in ("VAEDecode", f"{PID}RAEDecode"):
        return latent_size(prompt, inputs["samples" if cls == "VAEDecode" else "latent"], picture)
    if cls == "ImageStitch":
        assert inputs["direction"] in ("left", "right") and inputs["match_image_size"] is True
        w1, h1 = image_size(prompt, inputs["image1"], picture)
        w2, h2 = image_size(prompt, inputs["image2"], picture)
        return w1 + inputs["spacing_width"] + int(h1 * w2 / h2), h1
    if cls == "LoadImage":
        return picture
    raise AssertionError(f"image_size() does not know {cls}: add it")


def sampled_with(prompt: dict, ref: list) -> str | None:
    """The positive prompt's text of the run that made the LATENT (or CONDITIONING) output ``ref``, or None."""
    node = prompt[ref[0]]
    if node["class_type"] == "CLIPTextEncode":
        return node["inputs"]["text"]
    # back through samplers (positive; SamplerCustomAdvanced's guider), guidance and guiders (conditioning), and
    # nodes that pass a latent on (PiD Tag Latent)
    for name in ("positive", "guider", "conditioning", "latent_image", "latent"):
        if isinstance(node["inputs"].get(name), list):
            return sampled_with(prompt, node["inputs"][name])
    return None


def latent_size(prompt: dict, ref: list, picture: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in px of the picture the LATENT output ``ref`` stands for."""
    node = prompt[ref[0]]
    cls, inputs = node["class_type"], node["inputs"]
    if cls in EMPTY_LATENTS:
        return inputs["width"], inputs["height"]
    if cls in (f"{PID}KSamplerEarlyExit", "KSamplerAdvanced", "KSampler", "SamplerCustomAdvanced"):
        return latent_size(prompt, inputs["latent_image"], picture)
    if cls == f"{PID}TagLatent":
        return latent_size(prompt, inputs["latent"], picture)
    if cls == f"{PID}EncodeImage":
        loader = prompt[inputs["pid_decoder"][0]]
        if loader["inputs"]["rae_name"] != "none":  # a square crop, resized to the RAE encoder's input
            side = RAE_NATIVE_PX[checkpoint_space(loader)]
            return side, side
        width, height = image_size(prompt, inputs["image"], picture)  # centre crop to multiples of the 8 px cell
        return width // 8 * 8, height // 8 * 8
    raise AssertionError(f"latent_size() does not know {cls}: add it")


# --- tests -------------------------------------------------------------------------------------------
def test_every_definition_is_shipped_with_a_thumbnail(definitions):
    from PIL import Image

    assert sorted(definitions) == NAMES, (
        "workflows/ differs from the definitions in tests/workflows/build_workflows.py; "
        "run `.venv/bin/python tests/workflows/build_workflows.py`"
    )
    for name in NAMES:
        thumbnail = BUILD.WORKFLOWS_DIR / f"{name}.jpg"  # the template browser shows <name>.jpg
        assert thumbnail.is_file(), f"{thumbnail.name} is missing"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and image.width >= 800, (thumbnail.name, image.format, image.size)


def frontend_problems(result: dict) -> list[str]:
    """What is wrong with a workflow as the frontend loaded it (missing or flagged nodes, failed conversion)."""
    problems = [f"{n['id']}: the frontend has no node type {n['type']}" for n in result["nodes"] if not n["registered"]]
    problems += [f"{n['id']} {n['type']}: flagged with errors" for n in result["nodes"] if n["has_errors"]]
    problems += [f"dialog: {d[:300]}" for d in result["dialogs"] if re.search(r"missing node", d, re.IGNORECASE)]
    problems += [f"page error: {e}" for e in result["pageErrors"]]
    if result["promptError"] is not None:
        return problems + [f"app.graphToPrompt() failed: {result['promptError']}"]
    real = {str(n["id"]) for n in result["nodes"] if n["type"] not in VIRTUAL_TYPES and n["mode"] == 0}
    if set(result["prompt"]) != real:
        problems.append(f"graphToPrompt() gave nodes {sorted(result['prompt'])}, the graph has {sorted(real)}")
    return problems


def definition_problems(prompt: dict, expected: dict) -> list[str]:
    """Differences between the frontend's prompt and the definition, node by node and input by input."""
    if sorted(prompt, key=int) != sorted(expected, key=int):
        return [f"node ids {sorted(prompt, key=int)} differ from the definition's {sorted(expected, key=int)}"]
    problems = []
    for node_id, node in expected.items():
        got = prompt[node_id]
        if got["class_type"] != node["class_type"]:
            problems.append(f"{node_id}: {got['class_type']}, defined as {node['class_type']}")
            continue
        for name in sorted(set(got["inputs"]) | set(node["inputs"])):
            if got["inputs"].get(name, "<unset>") != node["inputs"].get(name, "<unset>"):
                problems.append(f"{node_id} {node['class_type']}.{name}: {got['inputs'].get(name, '<unset>')!r}, "
                                f"defined as {node['inputs'].get(name, '<unset>')!r}")  # fmt: skip
        if "_meta" in node and got.get("_meta", {}).get("title") != node["_meta"]["title"]:
            problems.append(f"{node_id}: title {got.get('_meta')}, defined as {node['_meta']['title']!r}")
    return problems


def pack_problems(result: dict, object_info: dict) -> list[str]:
    """Nodes, inputs, link types and values of the frontend's prompt (and widget names of its graph) that the
    server's /object_info does not have."""
    prompt = result["prompt"]
    problems = []
    for node_id, node in prompt.items():
        cls = node["class_type"]
        if cls not in object_info:
            problems.append(f"{node_id}: the server has no node {cls}")
            continue
        specs = input_specs(object_info[cls])
        for input_name, (_, required) in specs.items():
            if required and input_name not in node["inputs"]:
                problems.append(f"{node_id} {cls}: required input {input_name} is not set")
        for input_name, value in node["inputs"].items():
            where = f"{node_id} {cls}.{input_name}"
            if input_name not in specs:
                problems.append(f"{where}: {cls} has no such input")
                continue
            spec = specs[input_name][0]
            if isinstance(value, list):  # a link [node id, output slot]
                source = prompt[value[0]]["class_type"]
                outputs = object_info.get(source, {}).get("output", [])
                out_type = outputs[value[1]] if value[1] < len(outputs) else None
                want = "COMBO" if combo_options(spec) is not None else spec[0]
                if out_type != want and "*" not in (out_type, want):
                    problems.append(f"{where}: linked to {source} output {value[1]} ({out_type}), wants {want}")
                continue
            # File lists of the loaders the run replaces name files the test server does not have.
            check_options = not (cls in STAND_INS and input_name in BUILD.LOADER_FOLDERS.get(cls, {}))
            if problem := value_problem(value, spec, check_options):
                problems.append(f"{where}: {problem}")
    for node in result["nodes"]:
        if node["type"] in VIRTUAL_TYPES or node["type"] not in object_info:
            continue
        names = set(input_specs(object_info[node["type"]]))
        unknown = [w for w, _ in node["widgets"]
                   if w not in names and w not in FRONTEND_ONLY_WIDGETS and not w.startswith(FRONTEND_WIDGET_PREFIX)]
        if unknown:
            problems.append(f"{node['id']} {node['type']}: widgets that are no input of the node: {unknown}")
    return problems


def test_served_to_the_template_browser(comfy_server):
    """ComfyUI lists workflows/ of a custom node pack in its template browser, with <name>.jpg as thumbnail."""
    pack = comfy_server.pack_dir_name
    assert sorted(comfy_server.get_json("/workflow_templates").get(pack, [])) == NAMES
    for name in NAMES:
        for suffix in (".json", ".jpg"):
            status, body = comfy_server.request("GET", f"/api/workflow_templates/{pack}/{name}{suffix}")
            assert status == 200 and body, f"{name}{suffix}: HTTP {status}"
            if suffix == ".jpg":
                assert body[:3] == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"


@workflow_params()
def test_loads_in_the_frontend(name, loaded):
    problems = frontend_problems(loaded[name])
    assert not problems, "\n".join(problems)


@workflow_params()
def test_matches_its_definition_by_input_name(name, loaded, definitions):
    problems = definition_problems(loaded[name]["prompt"], definitions[name].prompt)
    assert not problems, "\n".join(problems) + "\n(rebuild with tests/workflows/build_workflows.py if intended)"


@workflow_params()
def test_nodes_inputs_and_values_exist(name, loaded, object_info, workflow_files):
    problems = pack_problems(loaded[name], object_info)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_renamed_node_input_or_value(frontend, object_info, definitions, workflow_files):
    """Each way a pack change can break a saved workflow is caught by one of the checks above."""
    name = "pid_flux1_dev_2048px_early_exit"
    original = json.loads((BUILD.WORKFLOWS_DIR / f"{name}.json").read_text())
    by_type = lambda wf, t: next(n for n in wf["nodes"] if n["type"] == t)  # noqa: E731

    renamed = copy.deepcopy(original)  # a node id the pack no longer has
    by_type(renamed, f"{PID}Decode")["type"] = f"{PID}DecodeRenamed"
    assert any("no node type" in p for p in frontend_problems(frontend.check(renamed)))

    bad_value = copy.deepcopy(original)  # a widget value the pack no longer offers
    by_type(bad_value, f"{PID}Decode")["widgets_values"][0] = "8192"
    result = frontend.check(bad_value)
    assert any("'8192' is not one of" in p for p in pack_problems(result, object_info))

    shifted = copy.deepcopy(original)  # values saved by position land on other inputs (an input was inserted)
    values = by_type(shifted, f"{PID}KSamplerEarlyExit")["widgets_values"]
    values.insert(2, values[2])  # seed, control, <new>, steps, ... : every later value moves one input on
    values.pop()
    result = frontend.check(shifted)
    assert any(".cfg:" in p for p in definition_problems(result["prompt"], definitions[name].prompt))

    randomized = copy.deepcopy(original)  # PiD Decode's seed control back at the frontend's default
    values = by_type(randomized, f"{PID}Decode")["widgets_values"]
    values[values.index("fixed")] = "randomize"
    assert any("'randomize'" in p for p in seed_control_problems(frontend.check(randomized), randomized))

    renamed_input = copy.deepcopy(object_info)  # the pack renames an input
    spec = renamed_input[f"{PID}KSamplerEarlyExit"]["input"]["required"]
    spec["exit_at"] = spec.pop("exit_step")
    problems = pack_problems(frontend.check(original), renamed_input)
    assert any("has no such input" in p for p in problems) and any("widgets that are no input" in p for p in problems)


@workflow_params()
def test_note_names_every_file(name, definitions):
    workflow = json.loads((BUILD.WORKFLOWS_DIR / f"{name}.json").read_text())
    notes = [n for n in workflow["nodes"] if n["type"] in NOTE_TYPES]
    assert len(notes) == 1, f"expected one note, found {len(notes)}"
    text = notes[0]["widgets_values"][0]
    files = definitions[name].files()
    assert files, "the workflow loads no file?"
    for item in files:
        assert f"`{item.where}`" in text, f"the note does not say where {item.name} goes ({item.folder}/)"
        if item.is_folder:  # an RAE folder: each of its files, under it
            section = text[text.index(f"`{item.where}`"):].split("\n- ", 1)[0]
            for file_name, _ in BUILD.RAE_FOLDERS[item.name].contents():
                assert f"  - `{file_name}`:" in section, f"the note does not list {file_name} in {item.where}"
    assert "Recommended settings" in text
    need = definitions[name].needs_comfyui
    assert need is None or need.sentence in text, "the note does not say which ComfyUI the workflow needs"


def test_gemma_download_link_is_pid_cores():
    """The notes and the template browser link the Gemma file that `python -m pid_core download --gemma` fetches."""
    from pid_core.download import GEMMA_FILES, GEMMA_REPO

    expected = f"https://huggingface.co/{GEMMA_REPO}/resolve/main/{GEMMA_FILES['bf16']}"
    assert BUILD.DOWNLOADS[BUILD.GEMMA_FILE] == expected


@workflow_params()
def test_pid_decode_gets_a_caption_from_gemma(name, loaded):
    prompt = loaded[name]["prompt"]
    decodes = [node for node in prompt.values() if node["class_type"] == f"{PID}Decode"]
    assert decodes, "the workflow has no PiD Decode"
    for decode in decodes:
        assert isinstance(decode["inputs"].get("caption"), list), "PiD Decode's caption is not connected"
        caption = prompt[decode["inputs"]["caption"][0]]
        assert caption["class_type"] == f"{PID}Caption", caption["class_type"]
        assert caption["inputs"]["gemma_name"] == "none" and isinstance(caption["inputs"].get("clip"), list)
        clip = prompt[caption["inputs"]["clip"][0]]
        assert is_gemma_clip(clip) and clip["inputs"]["type"] == "lumina2", clip
        text = sampled_with(prompt, decode["inputs"]["latent"])
        if text is not None:
            assert caption["inputs"]["text"] == text, "PiD Caption's text is not the prompt of the decoded run"
        elif checkpoint_space(prompt[decode["inputs"]["pid_decoder"][0]]) == "dinov2":
            # the reference captions DINOv2 decodes with an ImageNet class name (a word or two, no sentence)
            assert re.fullmatch(r"[a-z]+( [a-z]+){0,2}", caption["inputs"]["text"]), caption["inputs"]["text"]
        else:  # a picture from elsewhere (the upscale workflows): a description of it
            assert len(caption["inputs"]["text"].split()) >= 5, caption["inputs"]["text"]


def seed_control_problems(result: dict, workflow: dict) -> list[str]:
    """PiD Decode nodes whose seed control is not "fixed", as the frontend loaded them or as the file stores it:
    the frontend saves the control as the widget value right after the seed's."""
    saved = {str(n["id"]): n for n in workflow["nodes"]}  # current frontends report node ids as strings
    decodes = [n for n in result["nodes"] if n["type"] == f"{PID}Decode"]
    if not decodes:
        return ["the workflow has no PiD Decode"]
    problems = []
    for node in decodes:
        names = [w for w, _ in node["widgets"]]
        if names[names.index("seed") + 1 : names.index("seed") + 2] != ["control_after_generate"]:
            problems.append(f"{node['id']}: no control_after_generate after the seed in {names}")
            continue
        shown = dict(node["widgets"])["control_after_generate"]
        stored = saved[str(node["id"])]["widgets_values"][names.index("control_after_generate")]
        if (shown, stored) != ("fixed", "fixed"):
            problems.append(f"{node['id']} PiD Decode: seed control {shown!r} in the frontend, {stored!r} in the file")
    return problems


@workflow_params()
def test_pid_decode_keeps_its_seed(name, loaded):
    """Re-queueing an unchanged graph reuses ComfyUI's cached decode instead of redoing it with a new seed."""
    assert BUILD.SEED_CONTROL == "fixed"
    workflow = json.loads((BUILD.WORKFLOWS_DIR / f"{name}.json").read_text())
    problems = seed_control_problems(loaded[name], workflow)
    assert not problems, "\n".join(problems)


def test_a_new_pid_decode_starts_with_a_fixed_seed(frontend):
    """The pack's frontend extension (web/) sets a new PiD Decode's seed control to fixed; other nodes keep the
    frontend's default, and a loaded workflow keeps what it saved (test_the_checks_catch_a_renamed_node_...)."""
    created = frontend.request("create", types=[f"{PID}Decode", f"{PID}KSamplerEarlyExit"])["nodes"]
    controls = [dict(node["widgets"])["control_after_generate"] for node in created]
    assert controls == ["fixed", "randomize"]


@workflow_params()
def test_runs_on_the_cpu(name, loaded, object_info, comfy_server, workflow_files, input_picture_size):
    from PIL import ImageStat

    prompt = loaded[name]["prompt"]
    run, replaced, resized = run_prompt(prompt)

    # Only loaders are replaced, each by a stand-in with the same outputs; only the latent size changes.
    for node_id in replaced:
        original, stand_in = prompt[node_id]["class_type"], run[node_id]["class_type"]
        assert object_info[original]["output"] == object_info[stand_in]["output"], (original, stand_in)
    for node_id in resized:
        changed = {k for k in prompt[node_id]["inputs"] if prompt[node_id]["inputs"][k] != run[node_id]["inputs"][k]}
        assert changed <= {"width", "height"}, changed
    unchanged = {k for k in prompt if k not in replaced | resized}
    assert all(run[k] == prompt[k] for k in unchanged)
    assert set(run) == set(prompt)

    entry = comfy_server.run(run, timeout=RUN_TIMEOUT)

    saves = [k for k, node in run.items() if node["class_type"] == "SaveImage"]
    assert saves, "the workflow saves no picture"
    for node_id in saves:
        refs = entry["outputs"].get(node_id, {}).get("images", [])
        assert len(refs) == 1, f"SaveImage {node_id} reported {refs}"
        expected = image_size(run, run[node_id]["inputs"]["images"], input_picture_size)
        with comfy_server.image(refs[0]) as picture:
            assert picture.size == expected, f"SaveImage {node_id}: {picture.size}, expected {expected}"
            assert max(ImageStat.Stat(picture.convert("RGB")).stddev) > 1.0, "the picture is one flat colour"
