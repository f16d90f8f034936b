;;; rlm-contexts.el --- The list of the rlm daemon's contexts  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.
;;; Commentary:

;; `rlm-contexts' lists the daemon's contexts: name, size, tokens, age
;; and whether this Emacs made it.  Peek, search, ask, add files, and
;; mark several contexts to drop at once, as in Dired.

;;; Code:

(require 'cl-lib)
(require 'subr-x)
(require 'tabulated-list)
(require 'parse-time)
(require 'rlm-client)

(declare-function rlm-query-context "rlm" (question name))
(declare-function rlm--read-question "rlm" (&optional prompt))
(declare-function rlm--read-files "rlm" (&optional prompt))
(declare-function rlm--read-context "rlm" (&optional prompt))

(defcustom rlm-peek-chars 8000
  "Number of characters `rlm-contexts' shows when peeking at a context."
  :type 'integer
  :group 'rlm)

(defface rlm-context-mark '((t :inherit dired-mark))
  "Face of the mark of a context marked for dropping."
  :group 'rlm)

(defvar rlm-contexts-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "RET") #'rlm-contexts-peek)
    (define-key map (kbd "v") #'rlm-contexts-peek)
    (define-key map (kbd "s") #'rlm-contexts-search)
    (define-key map (kbd "d") #'rlm-contexts-mark-drop)
    (define-key map (kbd "m") #'rlm-contexts-mark-drop)
    (define-key map (kbd "u") #'rlm-contexts-unmark)
    (define-key map (kbd "U") #'rlm-contexts-unmark-all)
    (define-key map (kbd "x") #'rlm-contexts-drop-marked)
    (define-key map (kbd "D") #'rlm-contexts-drop)
    (define-key map (kbd "a") #'rlm-contexts-query)
    (define-key map (kbd "+") #'rlm-contexts-add-files)
    map)
  "Keymap of `rlm-contexts-mode'.")

(defun rlm--time-seconds (v)
  "Return V, seconds since the epoch or an ISO 8601 string, as seconds."
  (cond ((numberp v) v)
        ((stringp v) (ignore-errors (float-time (parse-iso8601-time-string v))))))

(defun rlm--age-string (v)
  "Return how long ago V (a time as `rlm--time-seconds' takes) was."
  (let ((s (rlm--time-seconds v)))
    (if (not s) ""
      (let ((d (max 0 (- (float-time) s))))
        (cond ((< d 60) (format "%ds" d))
              ((< d 3600) (format "%dm" (/ d 60)))
              ((< d 86400) (format "%dh" (/ d 3600)))
              (t (format "%dd" (/ d 86400))))))))

(defun rlm--origin (name)
  "Return who made the context NAME: \"this Emacs\", \"Emacs\" or \"\"."
  (cond ((rlm-context-created-here-p name) "this Emacs")
        ((string-match-p "\\`\\(?:emacs\\|files\\|text\\):" name) "Emacs")
        (t "")))

(defun rlm--sort-by (key)
  "Return a predicate sorting tabulated entries by KEY of their data."
  (lambda (a b)
    (< (or (rlm--time-seconds (plist-get (car a) key)) 0)
       (or (rlm--time-seconds (plist-get (car b) key)) 0))))

(define-derived-mode rlm-contexts-mode tabulated-list-mode "rlm-contexts"
  "Major mode listing the daemon's contexts.
\\<rlm-contexts-mode-map>\\[rlm-contexts-mark-drop] marks a context for dropping, \
\\[rlm-contexts-unmark] unmarks it, \\[rlm-contexts-drop-marked] drops the marked ones.

\\{rlm-contexts-mode-map}"
  (setq tabulated-list-format
        (vector '("Name" 40 t)
                (list "Size" 9 (rlm--sort-by :bytes) :right-align t)
                (list "Tokens" 8 (rlm--sort-by :tokens_est) :right-align t)
                (list "Age" 5 (rlm--sort-by :created) :right-align t)
                (list "Updated" 7 (rlm--sort-by :updated) :right-align t)
                '("Made by" 10 t)))
  (setq tabulated-list-sort-key '("Name" . nil))
  (setq tabulated-list-padding 2)
  (add-hook 'tabulated-list-revert-hook #'rlm--contexts-refresh nil t)
  (tabulated-list-init-header))

(defun rlm--contexts-refresh ()
  "Fetch the contexts from the daemon into this buffer."
  (setq tabulated-list-entries
        (mapcar (lambda (c)
                  (let ((name (plist-get c :name)))
                    (list c
                          (vector name
                                  (file-size-human-readable (or (plist-get c :bytes) 0))
                                  (rlm--format-count (plist-get c :tokens_est))
                                  (rlm--age-string (plist-get c :created))
                                  (rlm--age-string (plist-get c :updated))
                                  (rlm--origin name)))))
                (append (rlm-request 'context/list) nil))))

;;;###autoload
(defun rlm-contexts ()
  "List the daemon's contexts.
\\<rlm-contexts-mode-map>\\[rlm-contexts-peek] peeks, \\[rlm-contexts-search] searches, \
\\[rlm-contexts-mark-drop] marks for dropping, \\[rlm-contexts-query] asks a question."
  (interactive)
  (let ((buf (get-buffer-create "*rlm contexts*")))
    (with-current-buffer buf
      (rlm-contexts-mode)
      (rlm--contexts-refresh)
      (tabulated-list-print))
    (pop-to-buffer buf)
    buf))

(defun rlm--contexts-name ()
  "Return the name of the context at point."
  (or (plist-get (tabulated-list-get-id) :name)
      (user-error "No context on this line")))

(defun rlm-contexts-mark-drop ()
  "Mark the context at point for dropping and move down."
  (interactive)
  (rlm--contexts-name)
  (tabulated-list-put-tag (propertize "D" 'face 'rlm-context-mark) t))

(defun rlm-contexts-unmark ()
  "Unmark the context at point and move down."
  (interactive)
  (rlm--contexts-name)
  (tabulated-list-put-tag " " t))

(defun rlm-contexts-unmark-all ()
  "Unmark every context."
  (interactive)
  (save-excursion
    (goto-char (point-min))
    (while (not (eobp))
      (when (tabulated-list-get-id) (tabulated-list-put-tag " "))
      (forward-line 1))))

(defun rlm-contexts-marked ()
  "Return the names of the contexts marked for dropping."
  (let (names)
    (save-excursion
      (goto-char (point-min))
      (while (not (eobp))
        (when (and (tabulated-list-get-id) (eq (char-after) ?D))
          (push (plist-get (tabulated-list-get-id) :name) names))
        (forward-line 1)))
    (nreverse names)))

(defun rlm-contexts-drop-marked (&optional no-confirm)
  "Drop the marked contexts, after confirmation unless NO-CONFIRM."
  (interactive)
  (let ((names (or (rlm-contexts-marked) (user-error "No context is marked (d marks one)"))))
    (when (or no-confirm
              (yes-or-no-p (format "Drop %d context%s (%s)? " (length names)
                                   (if (cdr names) "s" "")
                                   (rlm--truncate (string-join names ", ") 60))))
      (dolist (n names) (rlm-drop n))
      (revert-buffer)
      (message "rlm: dropped %d context%s" (length names) (if (cdr names) "s" "")))
    names))

(defun rlm-contexts-drop ()
  "Drop the context at point, after confirmation."
  (interactive)
  (let ((name (rlm--contexts-name)))
    (when (yes-or-no-p (format "Drop context %s? " name))
      (rlm-drop name)
      (revert-buffer))))

(defun rlm-peek (name &optional start end)
  "Show the text of context NAME from START to END in a buffer."
  (interactive (list (rlm--read-context "Peek at context: ")))
  (let* ((start (or start 0))
         (end (or end (+ start rlm-peek-chars)))
         (text (plist-get (rlm-request 'context/peek (list :name name :start start :end end))
                          :text))
         (buf (get-buffer-create (format "*rlm peek: %s*" name))))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (insert text)
        (when (>= (length text) (- end start))
          (insert (propertize (format "\n[… characters %d-%d shown]\n" start end)
                              'face 'shadow)))
        (goto-char (point-min))
        (special-mode)
        (set-buffer-modified-p nil)))
    (pop-to-buffer buf)
    buf))

(defun rlm-contexts-peek (&optional arg)
  "Peek at the context at point; with ARG, read the character range."
  (interactive "P")
  (let ((name (rlm--contexts-name)))
    (if arg
        (rlm-peek name (read-number "Start: " 0) (read-number "End: " rlm-peek-chars))
      (rlm-peek name))))

(defun rlm-search (name pattern)
  "Show the matches of PATTERN (a Python regexp) in context NAME."
  (interactive (list (rlm--read-context "Search context: ")
                     (read-string "Python regexp: ")))
  (let* ((res (rlm-request 'context/search (list :name name :pattern pattern)))
         (matches (append (plist-get res :matches) nil))
         (buf (get-buffer-create (format "*rlm search: %s*" name))))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (insert (format "%d match%s of /%s/ in %s\n\n" (length matches)
                        (if (= (length matches) 1) "" "es") pattern name))
        (dolist (m matches)
          (insert (propertize (format "%6d: " (plist-get m :line)) 'face 'rlm-label)
                  (rlm--truncate (or (plist-get m :text) "") 200) "\n"))
        (goto-char (point-min))
        (special-mode)
        (set-buffer-modified-p nil)))
    (pop-to-buffer buf)
    matches))

(defun rlm-contexts-search (pattern)
  "Search the context at point for PATTERN."
  (interactive (list (read-string "Python regexp: ")))
  (rlm-search (rlm--contexts-name) pattern))

(defun rlm-contexts-query (question)
  "Ask QUESTION about the context at point."
  (interactive (list (rlm--read-question)))
  (rlm-query-context question (rlm--contexts-name)))

(defun rlm-contexts-add-files (files)
  "Have the daemon read FILES into a new context, then refresh."
  (interactive (list (rlm--read-files "Add file or directory as a context: ")))
  (rlm-files-context files)
  (revert-buffer))

(provide 'rlm-contexts)
;;; rlm-contexts.el ends here
