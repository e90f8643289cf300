from lmjax.cli import main

raise SystemExit(main())
