from gpt2lab.cli.main import main

main()
