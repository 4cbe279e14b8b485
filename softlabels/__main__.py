from softlabels.cli import main

main()
