import sys

from kfp_finetune.pipelines.cli import main

sys.exit(main())
