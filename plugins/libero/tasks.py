"""The LIBERO task suites: task instructions (``Task.language``) in benchmark order.

``Task.language`` is what VLA pipelines send as the prompt (openpi's LIBERO example, OpenVLA's RLDS
builder): the BDDL file name with underscores turned into spaces and the scene prefix stripped.
Source: ``libero/libero/benchmark/libero_suite_task_map.py`` (LIBERO, Liu et al., NeurIPS 2023).
"""

from __future__ import annotations

import re

LIBERO_SPATIAL = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "pick up the black bowl on the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the black bowl next to the plate and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
)

LIBERO_OBJECT_ITEMS = (
    "alphabet soup", "cream cheese", "salad dressing", "bbq sauce", "ketchup",
    "tomato sauce", "butter", "milk", "chocolate pudding", "orange juice",
)
LIBERO_OBJECT = tuple(f"pick up the {item} and place it in the basket" for item in LIBERO_OBJECT_ITEMS)

LIBERO_GOAL = (
    "open the middle drawer of the cabinet",
    "put the bowl on the stove",
    "put the wine bottle on top of the cabinet",
    "open the top drawer and put the bowl inside",
    "put the bowl on top of the cabinet",
    "push the plate to the front of the stove",
    "put the cream cheese in the bowl",
    "turn on the stove",
    "put the bowl on the plate",
    "put the wine bottle on the rack",
)

LIBERO_10 = (
    "put both the alphabet soup and the tomato sauce in the basket",
    "put both the cream cheese box and the butter in the basket",
    "turn on the stove and put the moka pot on it",
    "put the black bowl in the bottom drawer of the cabinet and close it",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "pick up the book and place it in the back compartment of the caddy",
    "put the white mug on the plate and put the chocolate pudding to the right of the plate",
    "put both the alphabet soup and the cream cheese box in the basket",
    "put both moka pots on the stove",
    "put the yellow and white mug in the microwave and close it",
)

SUITES: dict[str, tuple[str, ...]] = {
    "libero_spatial": LIBERO_SPATIAL,
    "libero_object": LIBERO_OBJECT,
    "libero_goal": LIBERO_GOAL,
    "libero_10": LIBERO_10,
}

_SCENE_PREFIX = re.compile(r"^(?:[A-Z_]+_SCENE\d+_)")


def task_name(instruction: str) -> str:
    """The pickles' ``task_name``: the instruction with spaces turned into underscores."""
    return instruction.replace(" ", "_")


def language_from_name(name: str) -> str:
    """``Task.language`` from a task or BDDL file name (LIBERO's ``grab_language_from_filename``)."""
    name = name[:-5] if name.endswith(".bddl") else name
    return _SCENE_PREFIX.sub("", name).replace("_", " ").strip()
