import sys

from capllm.cli.main import main

sys.exit(main())
