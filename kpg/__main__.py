from kpg.cli import main

main()
