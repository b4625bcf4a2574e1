from harness.lmeval import main

main()
