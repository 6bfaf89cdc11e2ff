from datamodules.prepare import main

main()
