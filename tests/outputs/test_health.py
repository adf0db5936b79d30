"""Head health pictures: every cell painted in the colour of its state, read back from the
rendered pixels; the legend names every state; alerts marked where they fired."""

from __future__ import annotations

import numpy as np
import pytest

from attn_probe.outputs import health
from attn_probe.outputs.canvas import plot_to_array
from attn_probe.snapshot import HEAD_STATES, HeadState, Snapshot

from .test_tensorboard import build_run


def rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i: i + 2], 16) for i in (1, 3, 5)])


def cell_colours(figure, rows: int, cols: int) -> np.ndarray:
    """(rows, cols, 3) RGB of the pixel at the centre of each cell of the figure's grid."""
    pixels = plot_to_array(figure)
    (ax,) = [ax for ax in figure.axes if ax.images]
    height = pixels.shape[0]
    out = np.zeros((rows, cols, 3), dtype=int)
    for row in range(rows):
        for col in range(cols):
            x, y = ax.transData.transform((col, row))
            out[row, col] = pixels[int(round(height - y)), int(round(x))]
    return out


def expected_colours(codes: np.ndarray) -> np.ndarray:
    return np.stack([[rgb(HEAD_STATES[HeadState(int(c))][1]) for c in row] for row in codes])


def legend_texts(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_head_state_map_paints_each_cell_in_its_state_colour():
    codes = np.arange(6 * 7).reshape(6, 7) % 7  # every state, in every column
    figure = health.head_state_map(codes, title="step 3")
    assert np.abs(cell_colours(figure, 6, 7) - expected_colours(codes)).max() <= 2
    assert legend_texts(figure) == [label for label, _, _ in HEAD_STATES.values()]
    (ax,) = [ax for ax in figure.axes if ax.images]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"L{i:02d}" for i in range(6)]
    assert ax.get_title() == "step 3"


def test_a_large_map_is_still_one_cell_per_head():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 7, (32, 32))
    figure = health.head_state_map(codes)
    assert np.abs(cell_colours(figure, 32, 32) - expected_colours(codes)).max() <= 2


def test_timeline_paints_the_worst_state_of_each_step_and_marks_the_alerts():
    steps = [0, 5, 10, 15, 20]
    codes = np.array([[1, 5, 6, 6, 6], [1, 1, 1, 6, 6], [0, 4, 4, 4, 4]])
    figure = health.health_timeline(steps, codes, alerts=[(10, 0), (15, 1), (99, 0)])
    colours, want = cell_colours(figure, 3, 5), expected_colours(codes)
    crossed = np.zeros((3, 5), bool)
    crossed[0, 2] = crossed[1, 3] = True  # a white cross sits on these cells' centres
    assert np.abs(colours[~crossed] - want[~crossed]).max() <= 2
    assert (colours[crossed] == 255).all()
    (ax,) = [ax for ax in figure.axes if ax.images]
    (crosses,) = [line for line in ax.get_lines() if line.get_marker() == "X"]
    # columns, not steps: step 10 is column 2; an alert at a step not drawn is left out
    assert list(zip(crosses.get_xdata(), crosses.get_ydata())) == [(2, 0), (3, 1)]
    assert "alert fired" in legend_texts(figure)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in steps]
    with pytest.raises(ValueError, match="4 steps for 5 columns"):
        health.health_timeline(steps[:4], codes)


def test_unknown_codes_are_drawn_as_no_data_and_worst_states_of_a_snapshot():
    figure = health.head_state_map(np.array([[1, 42]]))
    colours = cell_colours(figure, 1, 2)
    assert np.abs(colours[0, 1] - rgb(HEAD_STATES[HeadState.NO_DATA][1])).max() <= 2
    snapshots, _ = build_run()
    layers = snapshots[0].layers
    states = {layers[0].name: np.array([1, 3, 2, 1]), layers[2].name: np.array([6, 1, 1, 1])}
    snapshot = Snapshot(step=0, tau=0.9, layers=layers, states=states)
    assert health.worst_states(snapshot).tolist() == [3, 0, 6, 0]
