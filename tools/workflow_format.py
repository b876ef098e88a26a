"""ComfyUI workflow JSON: a small builder for UI-format files (schema 0.4), a UI -> API converter, and a
validator, all driven by /object_info-style node descriptions (no ComfyUI needed)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "object_info_comfyui_0.3.64.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


# --------------------------------------------------------------------------- node descriptions
DEFAULT_FILES = {"checkpoints": ["v1-5-pruned-emaonly.safetensors"], "loras": ["sks_fabric.safetensors"]}


def pack_object_info(files: dict | None = None) -> dict:
    """/object_info entries for this pack's nodes, built from NODE_CLASS_MAPPINGS (as ComfyUI's server does).

    Outside ComfyUI, file lists (checkpoints, loras) come from `files` instead of folder_paths.
    """
    import importlib.util
    import sys

    name = "dreamloom_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    pack = sys.modules[name]
    comfy = sys.modules[f"{name}.nodes.comfy"]
    listing = {**DEFAULT_FILES, **(files or {})}
    real = comfy.filename_list
    try:
        comfy.filename_list(next(iter(listing)))
    except ImportError:  # not inside ComfyUI
        comfy.filename_list = lambda kind: list(listing.get(kind, []))
    try:
        return _describe(pack)
    finally:
        comfy.filename_list = real


def _describe(pack) -> dict:
    info = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        info[node_id] = {
            "input": {k: v for k, v in inputs.items() if k in ("required", "optional")},
            "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": node_id,
            "display_name": pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id),
            "category": cls.CATEGORY,
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return info


def object_info() -> dict:
    core = json.loads(SNAPSHOT.read_text())["nodes"]
    return {**core, **pack_object_info()}


def input_specs(info: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, type, options, required) in the node's input order."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {}) or {}
        order = (info.get("input_order") or {}).get(section) or list(specs)
        for name in order:
            spec = specs[name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, opts, section == "required"))
    return out


def is_widget(kind, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def combo_options(kind, opts: dict) -> list | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return opts.get("options", [])
    return None


def type_name(kind) -> str:
    return "COMBO" if isinstance(kind, list) else str(kind)


# --------------------------------------------------------------------------- builder
class Workflow:
    """Build a UI-format workflow by naming inputs and outputs; widget values in any order."""

    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[tuple] = []  # (id, src, src_slot, dst, dst_input_name, type)

    def add(self, node_type: str, pos, widgets: dict | None = None, title: str | None = None, size=None) -> int:
        if node_type not in self.info:
            raise KeyError(f"unknown node type {node_type}")
        node_id = len(self.nodes) + 1
        self.nodes.append(
            {
                "id": node_id,
                "type": node_type,
                "pos": list(pos),
                "widgets": dict(widgets or {}),
                "title": title,
                "size": size,
            }
        )
        return node_id

    def note(self, text: str, pos, size=(420, 220)) -> int:
        node_id = len(self.nodes) + 1
        self.nodes.append({"id": node_id, "type": "Note", "pos": list(pos), "text": text, "size": list(size)})
        return node_id

    def link(self, src: int, output: str | int, dst: int, input_name: str) -> None:
        src_info = self.info[self.nodes[src - 1]["type"]]
        slot = output if isinstance(output, int) else src_info["output_name"].index(output)
        self.links.append((len(self.links) + 1, src, slot, dst, input_name, src_info["output"][slot]))

    def to_ui(self) -> dict:
        nodes_out = []
        order = _topological(len(self.nodes), [(link[1], link[3]) for link in self.links])
        for node in self.nodes:
            nid = node["id"]
            if node["type"] == "Note":
                nodes_out.append(
                    {
                        "id": nid,
                        "type": "Note",
                        "pos": node["pos"],
                        "size": node["size"],
                        "flags": {},
                        "order": order[nid],
                        "mode": 0,
                        "inputs": [],
                        "outputs": [],
                        "properties": {"text": ""},
                        "widgets_values": [node["text"]],
                        "color": "#432",
                        "bgcolor": "#653",
                    }
                )
                continue
            info = self.info[node["type"]]
            incoming = {link[4]: link for link in self.links if link[3] == nid}
            inputs, widgets_values = [], []
            for name, kind, opts, _ in input_specs(info):
                widget = is_widget(kind, opts)
                if not widget or name in incoming:
                    entry = {
                        "name": name,
                        "type": type_name(kind),
                        "link": incoming[name][0] if name in incoming else None,
                    }
                    if widget:
                        entry["widget"] = {"name": name}
                    inputs.append(entry)
                if widget:
                    if name in node["widgets"]:
                        value = node["widgets"][name]
                    elif "default" in opts:
                        value = opts["default"]
                    else:
                        options = combo_options(kind, opts)
                        value = options[0] if options else ""
                    widgets_values.append(value)
                    if opts.get("control_after_generate"):
                        widgets_values.append("fixed")
            unknown = set(node["widgets"]) - {n for n, k, o, _ in input_specs(info) if is_widget(k, o)}
            if unknown:
                raise KeyError(f"{node['type']}: no widgets named {sorted(unknown)}")
            outputs = []
            for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
                links = [link[0] for link in self.links if link[1] == nid and link[2] == slot]
                outputs.append({"name": oname, "type": otype, "links": links, "slot_index": slot})
            n_rows = max(len(inputs), len(outputs)) + len(widgets_values)
            # The editor gives a multi-line text box at least 60 px (and 20 more for its margins) where a
            # one-line widget takes 24: the stored size is what the editor shows, so layout checks can trust it.
            multiline = sum(
                1 for _, kind, opts, _ in input_specs(info) if is_widget(kind, opts) and opts.get("multiline")
            )
            entry = {
                "id": nid,
                "type": node["type"],
                "pos": node["pos"],
                "size": node["size"] or [320, 30 + 24 * n_rows + 56 * multiline],
                "flags": {},
                "order": order[nid],
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node["type"]},
                "widgets_values": widgets_values,
            }
            if node["title"]:
                entry["title"] = node["title"]
            nodes_out.append(entry)
        links_out = []
        for lid, src, slot, dst, input_name, ltype in self.links:
            dst_inputs = next(n for n in nodes_out if n["id"] == dst)["inputs"]
            dst_slot = [i["name"] for i in dst_inputs].index(input_name)
            links_out.append([lid, src, slot, dst, dst_slot, ltype])
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes_out,
            "links": links_out,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


def _topological(n: int, edges: list[tuple[int, int]]) -> dict[int, int]:
    indeg = {i: 0 for i in range(1, n + 1)}
    for _, b in edges:
        indeg[b] += 1
    ready = sorted(i for i, d in indeg.items() if d == 0)
    order, k = {}, 0
    while ready:
        i = ready.pop(0)
        order[i] = k
        k += 1
        for a, b in edges:
            if a == i:
                indeg[b] -= 1
                if indeg[b] == 0:
                    ready.append(b)
        ready.sort()
    if len(order) != n:
        raise ValueError("the workflow has a cycle")
    return order


# --------------------------------------------------------------------------- UI -> API
def ui_to_api(ui: dict, info: dict) -> dict:
    """The API-format prompt the frontend would queue for a UI-format workflow."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        spec = info[node["type"]]
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, kind, opts, _ in input_specs(spec):
            widget = is_widget(kind, opts)
            if widget:
                value = values.pop(0) if values else None
                if opts.get("control_after_generate") and values:
                    values.pop(0)
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
            elif widget:
                inputs[name] = value
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title") or spec.get("display_name") or node["type"]},
        }
    return prompt


# --------------------------------------------------------------------------- validation
def validate_ui(ui: dict, info: dict, allow_files: dict | None = None) -> list[str]:
    """Problems in a UI-format workflow: unknown nodes, bad widget values, mismatched or dangling links."""
    problems = []
    by_id = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    if ui.get("version") != 0.4:
        problems.append(f"version is {ui.get('version')}, expected 0.4")
    for lid, src, slot, dst, dst_slot, _type in ui["links"]:
        if src not in by_id or dst not in by_id:
            problems.append(f"link {lid} joins a missing node")
            continue
        s, d = by_id[src], by_id[dst]
        if slot >= len(s["outputs"]) or lid not in s["outputs"][slot]["links"]:
            problems.append(f"link {lid} is not listed on {s['type']}#{src} output {slot}")
        if dst_slot >= len(d["inputs"]) or d["inputs"][dst_slot]["link"] != lid:
            problems.append(f"link {lid} is not listed on {d['type']}#{dst} input {dst_slot}")
            continue
        out_type = s["outputs"][slot]["type"]
        in_type = d["inputs"][dst_slot]["type"]
        if s["type"] in info:
            out_type = info[s["type"]]["output"][slot]
        if out_type != in_type and "*" not in (out_type, in_type) and not (in_type == "COMBO" and out_type == "STRING"):
            problems.append(
                f"link {lid}: {s['type']} gives {out_type} but {d['type']}.{d['inputs'][dst_slot]['name']} takes "
                f"{in_type}"
            )
    for node in ui["nodes"]:
        t = node["type"]
        if t in FRONTEND_ONLY:
            continue
        if t not in info:
            problems.append(f"node {node['id']}: unknown type {t}")
            continue
        specs = input_specs(info[t])
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        expected = sum(1 + bool(o.get("control_after_generate")) for _, k, o, _ in specs if is_widget(k, o))
        if len(values) != expected:
            problems.append(f"{t}#{node['id']}: {len(values)} widget values, expected {expected}")
            continue
        for name, kind, opts, required in specs:
            if not is_widget(kind, opts):
                if required and name not in linked:
                    problems.append(f"{t}#{node['id']}: required input {name} is not connected")
                continue
            value = values.pop(0)
            if opts.get("control_after_generate"):
                control = values.pop(0)
                if control not in ("fixed", "increment", "decrement", "randomize"):
                    problems.append(f"{t}#{node['id']}.{name}: bad control value {control!r}")
            if name in linked:
                continue
            problems += _check_value(f"{t}#{node['id']}.{name}", kind, opts, value, (allow_files or {}).get((t, name)))
        for i in node.get("inputs", []):
            if i.get("link") is not None and i["link"] not in links:
                problems.append(f"{t}#{node['id']}.{i['name']}: link {i['link']} does not exist")
    return problems


def _check_value(where: str, kind, opts: dict, value, allowed_extra) -> list[str]:
    options = combo_options(kind, opts)
    if options is not None:
        if value not in options and value not in (allowed_extra or ()):
            return [f"{where}: {value!r} is not one of the choices"]
        return []
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: {value!r} is not an integer"]
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{where}: {value!r} is not a number"]
    elif kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    elif kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    if "min" in opts and value < opts["min"]:
        return [f"{where}: {value} is below the minimum {opts['min']}"]
    if "max" in opts and value > opts["max"]:
        return [f"{where}: {value} is above the maximum {opts['max']}"]
    return []
