
importedpeft/adapter