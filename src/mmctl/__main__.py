from mmctl.entry import main

main()
