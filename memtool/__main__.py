from memtool.cli.app import main

main()
