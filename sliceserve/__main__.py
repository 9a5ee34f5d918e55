from sliceserve.cli import main

raise SystemExit(main())
