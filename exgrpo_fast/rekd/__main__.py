from exgrpo_fast.rekd.train import main

if __name__ == "__main__":
    main()
