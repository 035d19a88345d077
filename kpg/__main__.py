from kpg.app.cli import main

main()
