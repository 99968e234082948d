from dagsmith.cli import main

main()
