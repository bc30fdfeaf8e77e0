"""capllm.grid — the benchmark grid: run every (model, method, ratio) cell as its own
``capllm compress`` process (:mod:`~capllm.grid.run`), read the finished cells
(:mod:`~capllm.grid.cells`) and write ``report.md`` with its plots (:mod:`~capllm.grid.report`).

It sits above the methods and the evaluator; :mod:`capllm.eval` knows no method.
"""
