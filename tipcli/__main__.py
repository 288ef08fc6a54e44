from tipcli.cli import main

main()
