from ca_daemon.cli import main

raise SystemExit(main())
