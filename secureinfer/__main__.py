from secureinfer.cli import main

raise SystemExit(main())
