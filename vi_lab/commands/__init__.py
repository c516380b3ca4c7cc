"""The subcommands of ``vi-lab`` (:mod:`vi_lab.cli`), one module each: the top floor.

Each module declares its options once (``build_parser``), turns them into a frozen
``Config`` (``parse_args``), does the job with the library's functions (``main``) and is
run by ``run(argv, prog)``, which turns the errors a user can fix into one line. The
examples call the same modules, so a command and its example write the same outputs.
"""
