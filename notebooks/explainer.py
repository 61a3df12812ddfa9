"""The interactive explainer: move T, --kl, top-K and lambda and watch what each method hands the student at real
positions of the demo's models, beside the demo's real training and held-out curves.

    make notebook                                                  # = marimo edit notebooks/explainer.py
    marimo edit notebooks/explainer.py -- --demo demo_out/quick    # another demo folder (or DISTILL_DEMO=DIR)
    marimo export html notebooks/explainer.py -o explainer.html -- --demo demo_out/full   # headless, static

It reads a finished `make demo` (demo_out/full, else demo_out/quick). Every number comes from explain_demo.py's
functions (explainer_positions, explainer_hands, explainer_figure, curves_figure): this file only wires sliders.
"""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import os
    import sys

    import marimo as mo

    sys.path.insert(0, str(mo.notebook_dir().parent))
    import explain_demo

    return explain_demo, mo, os


@app.cell
def _(explain_demo, mo, os):
    demo = explain_demo.find_demo(mo.cli_args().get("demo") or os.environ.get("DISTILL_DEMO"))
    mo.stop(demo is None, mo.md(explain_demo.NO_DEMO))
    mo.md(f"# What each distillation method hands the student\n\nThe demo's own models (`{demo}`), on one "
          "held-out row: the teacher's completion of a dev prompt. Pick a position and the settings.")
    return (demo,)


@app.cell
def _(demo, explain_demo):
    positions = explain_demo.explainer_positions(demo)
    return (positions,)


@app.cell
def _(mo, positions):
    temperature = mo.ui.slider(0.25, 4.0, step=0.25, value=2.0, label="temperature T")
    kl = mo.ui.dropdown(["forward", "reverse", "jsd"], value="forward", label="--kl")
    beta = mo.ui.slider(0.05, 0.95, step=0.05, value=0.5, label="JSD beta (with --kl jsd)")
    top_k = mo.ui.slider(1, 50, value=20, label="top-K (cross-tokenizer)")
    lmbda = mo.ui.slider(0.0, 1.0, step=0.05, value=0.5, label="lambda: share of on-policy steps")
    position = mo.ui.slider(0, len(positions["tokens"]) - 1, value=int(positions["entropy"].argmax()),
                            label="completion position (starts where the teacher is least sure)")
    student = mo.ui.dropdown(["distilled", "base"], value="distilled",
                             label="student: each method's distilled one, or the base before distillation")
    mo.vstack([mo.hstack([temperature, kl, beta]), mo.hstack([top_k, lmbda]), position, student])
    return beta, kl, lmbda, position, student, temperature, top_k


@app.cell
def _(beta, explain_demo, kl, lmbda, mo, position, positions, student, temperature, top_k):
    hands = explain_demo.explainer_hands(positions, position.value, student=student.value,
                                         temperature=temperature.value, beta=explain_demo.kl_beta(kl.value, beta.value),
                                         top_k=top_k.value, lmbda=lmbda.value)
    mo.vstack([mo.md("## What each method hands the student"), mo.md(explain_demo.hands_markdown(hands)),
               mo.as_html(explain_demo.explainer_figure(hands, positions, position.value))])
    return


@app.cell
def _(demo, explain_demo, mo):
    mo.vstack([mo.md("## Training and held-out curves (the demo's real runs)"),
               mo.as_html(explain_demo.curves_figure(explain_demo.demo_curves(demo)))])
    return


if __name__ == "__main__":
    app.run()
