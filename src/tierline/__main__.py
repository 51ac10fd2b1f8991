from tierline.cli import main

main()
