"""A workflow in ComfyUI's API format, checked as ComfyUI checks it before queueing: every node a
known class, every input known and present, every link to an existing node's output of the
right type, no cycle, every value of its type and within its range or list. What fails is
answered as ComfyUI answers it: a 400 with `error` and `node_errors`, naming the node, its input
and why (`WorkflowRefused`).

The values a check passes are the workflow's; plan.py then recognises what the nodes draw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backends.api.comfyui.nodes import NODES, Input, Node

MAX_NODES = 200  # a workflow of the nodes here has a dozen or two; this bounds the checks' work


class WorkflowRefused(Exception):
    """ComfyUI's 400 for a prompt it will not queue: `{"error": ..., "node_errors": ...}`."""

    def __init__(self, error_type: str, message: str, details: str = "", node_errors: dict | None = None):
        super().__init__(message)
        self.body = {
            "error": {"type": error_type, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {},
        }


def node_error(
    node_id: str, class_type: str, input_name: str | None, message: str, error_type: str, value: Any = None
) -> WorkflowRefused:
    """One node's error, as ComfyUI's `node_errors` carries it."""
    extra: dict[str, Any] = {"input_name": input_name} if input_name else {}
    if value is not None:
        extra["received_value"] = value
    error = {"type": error_type, "message": message, "details": f"{input_name or class_type}: {message}"}
    return WorkflowRefused(
        "prompt_outputs_failed_validation",
        "Prompt outputs failed validation",
        f"node {node_id} ({class_type}): {message}",
        {node_id: {"errors": [{**error, "extra_info": extra}], "dependent_outputs": [], "class_type": class_type}},
    )


class Workflow:
    """A checked workflow: its nodes by id, each link resolved to (node id, output index)."""

    def __init__(self, prompt: Any, choices: Callable[[str], list[str] | None]):
        """`choices(name)` is the server's list for a COMBO that names one (checkpoints, loras);
        None where any value is checked later (uploads: plan.py reads them)."""
        if not isinstance(prompt, dict) or not prompt:
            raise WorkflowRefused("invalid_prompt", "prompt: a workflow in API format (an object of nodes) is needed")
        if len(prompt) > MAX_NODES:
            raise WorkflowRefused("invalid_prompt", f"prompt: {len(prompt)} nodes; at most {MAX_NODES} are taken")
        self.nodes: dict[str, dict[str, Any]] = {}
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise WorkflowRefused(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            if node["class_type"] not in NODES:
                raise WorkflowRefused(
                    "missing_node_type",
                    f"Node '{node['class_type']}' not found. This server runs the core SDXL nodes "
                    f"(GET /object_info lists them).",
                    f"Node ID '#{node_id}'",
                )
            inputs = node.get("inputs", {})
            if not isinstance(inputs, dict):
                raise node_error(node_id, node["class_type"], None, "inputs must be an object", "invalid_input_type")
            self.nodes[str(node_id)] = {"class_type": node["class_type"], "inputs": inputs}
        self.outputs = [node_id for node_id, node in self.nodes.items() if NODES[node["class_type"]].output_node]
        if not self.outputs:
            raise WorkflowRefused("prompt_no_outputs", "Prompt has no outputs", "add a SaveImage or PreviewImage node")
        for node_id in self.nodes:
            self._check_node(node_id, choices)
        self._check_acyclic()

    def class_of(self, node_id: str) -> str:
        return self.nodes[node_id]["class_type"]

    def value(self, node_id: str, name: str) -> Any:
        return self.nodes[node_id]["inputs"].get(name)

    def link(self, node_id: str, name: str) -> tuple[str, int]:
        source, index = self.nodes[node_id]["inputs"][name]
        return str(source), int(index)

    def _check_node(self, node_id: str, choices: Callable[[str], list[str] | None]) -> None:
        class_type = self.class_of(node_id)
        node, inputs = NODES[class_type], self.nodes[node_id]["inputs"]
        for name in inputs:
            if name not in node.inputs and name not in node.optional:
                known = ", ".join(node.inputs)
                raise node_error(
                    node_id, class_type, name, f"unknown input '{name}' (it takes {known})", "unknown_input"
                )
        for name, spec in node.inputs.items():
            if name not in inputs:
                if name in node.optional:
                    continue
                raise node_error(node_id, class_type, name, "Required input is missing", "required_input_missing")
            if spec.is_link:
                self._check_link(node_id, class_type, name, spec)
            else:
                self._check_value(node_id, class_type, name, spec, node, choices)

    def _check_link(self, node_id: str, class_type: str, name: str, spec: Input) -> None:
        value = self.nodes[node_id]["inputs"][name]
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)):
            raise node_error(
                node_id,
                class_type,
                name,
                f"a {spec.kind} input takes a link, [node id, output index]",
                "bad_linked_input",
                value,
            )
        source = str(value[0])
        if source not in self.nodes:
            raise node_error(
                node_id,
                class_type,
                name,
                f"it links to node '{source}', which the prompt does not have",
                "missing_link",
            )
        outputs = NODES[self.class_of(source)].outputs
        if not 0 <= value[1] < len(outputs) or outputs[value[1]] != spec.kind:
            got = outputs[value[1]] if 0 <= value[1] < len(outputs) else f"no output {value[1]}"
            raise node_error(
                node_id,
                class_type,
                name,
                f"Return type mismatch between linked nodes: {name}, "
                f"received_type({got}) mismatch input_type({spec.kind})",
                "return_type_mismatch",
            )

    def _check_value(
        self,
        node_id: str,
        class_type: str,
        name: str,
        spec: Input,
        node: Node,
        choices: Callable[[str], list[str] | None],
    ) -> None:
        value = self.nodes[node_id]["inputs"][name]
        if isinstance(value, list):
            raise node_error(
                node_id, class_type, name, f"{name} is a widget here: a value, not a link", "bad_linked_input", value
            )
        if spec.kind in ("INT", "FLOAT"):
            number = (
                value
                if spec.kind == "FLOAT"
                else (int(value) if isinstance(value, float) and value.is_integer() else value)
            )
            if (
                isinstance(number, bool)
                or not isinstance(number, (int, float))
                or (spec.kind == "INT" and not isinstance(number, int))
            ):
                raise node_error(
                    node_id,
                    class_type,
                    name,
                    f"Failed to convert an input value to a {spec.kind} value",
                    "invalid_input_type",
                    value,
                )
            if number < spec.options["min"]:
                raise node_error(
                    node_id,
                    class_type,
                    name,
                    f"Value {value} smaller than min of {spec.options['min']}",
                    "value_smaller_than_min",
                    value,
                )
            if number > spec.options["max"]:
                raise node_error(
                    node_id,
                    class_type,
                    name,
                    f"Value {value} bigger than max of {spec.options['max']}",
                    "value_bigger_than_max",
                    value,
                )
            self.nodes[node_id]["inputs"][name] = number
        elif spec.kind == "STRING" and not isinstance(value, str):
            raise node_error(node_id, class_type, name, "a STRING input takes text", "invalid_input_type", value)
        elif spec.kind == "BOOLEAN" and not isinstance(value, bool):
            raise node_error(
                node_id, class_type, name, "a BOOLEAN input takes true or false", "invalid_input_type", value
            )
        elif spec.kind == "COMBO":
            listed = choices(spec.choices) if isinstance(spec.choices, str) else spec.choices
            if listed is not None and value not in listed:
                shown = ", ".join(map(str, listed[:20])) or "none served"
                raise node_error(
                    node_id,
                    class_type,
                    name,
                    f"Value not in list: {name}: '{value}' not in [{shown}]",
                    "value_not_in_list",
                    value,
                )

    def _check_acyclic(self) -> None:
        """No node may depend on itself (ComfyUI finds this while running; here, before queueing)."""
        state: dict[str, int] = {}  # 1: being visited, 2: done

        def visit(node_id: str) -> None:
            state[node_id] = 1
            node = NODES[self.class_of(node_id)]
            for name, spec in node.inputs.items():
                if not spec.is_link or name not in self.nodes[node_id]["inputs"]:
                    continue
                source, _ = self.link(node_id, name)
                if state.get(source) == 1:
                    raise node_error(
                        node_id,
                        self.class_of(node_id),
                        name,
                        f"a dependency cycle through node '{source}'",
                        "dependency_cycle",
                    )
                if source not in state:
                    visit(source)
            state[node_id] = 2

        for node_id in self.nodes:
            if node_id not in state:
                visit(node_id)
