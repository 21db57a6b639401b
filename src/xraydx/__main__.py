from xraydx.cli import main

raise SystemExit(main())
