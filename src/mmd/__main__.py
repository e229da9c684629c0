from mmd.daemon import main

main()
