"""Applications built on the generation engine: a story writer, a chatbot, data augmentation.

Each module is the Python API its command calls: :mod:`gpt2lab.apps.story`, :mod:`gpt2lab.apps.chat`,
:mod:`gpt2lab.apps.augment`.
"""
