from retclip.cli import main

main()
