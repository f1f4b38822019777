"""The jobs evaluate.py calls, one file each; none of them imports tasks/ or evaluate.py.

    model.py     a model under evaluation: loading with its run's prompt decoration, greedy
                 generation, next-token probabilities, teacher-forced log-likelihood
    judge.py     what an answer to a harmful or benign request did (refused, harmful, ...)
    scoring.py   capability scores: math answer extraction, the open task's checklist
    stats.py     intervals and paired tests that agree with each other; Holm; the seed bootstrap
    compare.py   a run's eval.json against its start's, item by item
    report.py    the sweep's table, CSV and plots
"""
