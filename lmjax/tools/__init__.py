"""The tools floor, for operators rather than the training path: ahead-of-time compiles for TPU
(`aot`), `lmjax plan` (`plan/`), the step-time model (`roofline`), the collectives of compiled
HLO (`hlo`), timings (`bench`), the SIGKILL soak (`soak`) and the end-to-end smoke check
(`smoke`).

May import every library floor; nothing below it imports tools. Re-exports nothing.
"""
