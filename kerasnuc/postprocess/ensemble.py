"""Pixel-wise ensembles of several models' masks and probability maps.

Why: combining models' foreground masks with set logic (e.g. "a | (b & c)": keep what
model a finds, plus what b and c agree on), by majority, or by averaging probabilities
often beats the single best model. Expressions come from configs, so they are parsed
with a whitelist, never evaluated as Python.
"""

import ast

import numpy as np

__all__ = ["ensemble_masks", "parse_mask_expression", "majority_vote", "mean_probability"]

MAX_EXPRESSION_LENGTH = 1000


def parse_mask_expression(expression):
    """Parse ``expression`` (names, ``|``, ``&``, ``~``, parentheses) to a checked ``ast`` tree.

    Raises ValueError naming the first construct that is not allowed (calls, attributes,
    numbers, other operators, ...).
    """
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("mask expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ValueError(f"mask expression longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"mask expression {expression!r} is not valid: {error.msg}") from None
    _check_node(tree.body, expression)
    return tree.body


def _check_node(node, expression):
    if isinstance(node, ast.Name):
        return
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
        _check_node(node.left, expression)
        _check_node(node.right, expression)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        _check_node(node.operand, expression)
        return
    what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
    raise ValueError(
        f"mask expression {expression!r} uses {what!s}, which is not allowed: "
        "only mask names, '|' (or), '&' (and), '~' (not) and parentheses")


def _evaluate(node, masks):
    if isinstance(node, ast.Name):
        return masks[node.id]
    if isinstance(node, ast.UnaryOp):
        return ~_evaluate(node.operand, masks)
    left, right = _evaluate(node.left, masks), _evaluate(node.right, masks)
    return left | right if isinstance(node.op, ast.BitOr) else left & right


def ensemble_masks(expression, masks):
    """(H, W) bool mask from set logic over named masks, e.g. ``"a | (b & c)"``.

    ``masks``: dict name -> array of one shape (bool, or anything, read as ``!= 0``).
    Unknown names, shape mismatches and any syntax beyond names, ``|``, ``&``, ``~`` and
    parentheses raise ValueError; nothing is ever passed to ``eval``.
    """
    tree = parse_mask_expression(expression)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    unknown = sorted(names - set(masks))
    if unknown:
        raise ValueError(f"mask expression names {unknown}, not among the masks {sorted(masks)}")
    arrays = {name: np.asarray(masks[name]) != 0 for name in names}
    shapes = {array.shape for array in arrays.values()}
    if len(shapes) > 1:
        found = {name: array.shape for name, array in arrays.items()}
        raise ValueError(f"masks in the expression differ in shape: {found}")
    return _evaluate(tree, arrays)


def _as_list(items):
    items = list(items.values()) if isinstance(items, dict) else list(items)
    if not items:
        raise ValueError("nothing to combine")
    arrays = [np.asarray(item) for item in items]
    if len({array.shape for array in arrays}) > 1:
        raise ValueError(f"arrays differ in shape: {[array.shape for array in arrays]}")
    return arrays


def majority_vote(masks, min_votes=None):
    """Bool mask of pixels set in at least ``min_votes`` masks (default a majority, n // 2 + 1).

    ``masks``: list or dict of same-shape arrays (read as ``!= 0``).
    """
    arrays = _as_list(masks)
    min_votes = len(arrays) // 2 + 1 if min_votes is None else int(min_votes)
    votes = np.sum([array != 0 for array in arrays], axis=0)
    return votes >= min_votes


def mean_probability(maps, weights=None):
    """float32 (weighted) mean of same-shape probability maps; ``maps`` a list or dict."""
    arrays = _as_list(maps)
    weights = np.ones(len(arrays)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(arrays),) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"weights must be {len(arrays)} non-negative numbers with a positive sum")
    total = sum(w * array.astype(np.float64) for w, array in zip(weights, arrays))
    return (total / weights.sum()).astype(np.float32)
